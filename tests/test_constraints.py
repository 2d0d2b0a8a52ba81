"""The test environment is reproducible: scripts/test-constraints.txt pins every test extra that it names
inside pyproject's range for it, pins nothing the project does not use for tests, and never mentions torch
(the project does not cap it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "scripts" / "test-constraints.txt"


def pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    assert all(str(r.specifier).startswith("==") for r in reqs), reqs
    return {canonicalize_name(r.name): str(r.specifier)[2:] for r in reqs}


def test_pins_lie_in_the_test_extras_ranges() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, extras)}
    pinned = pins()
    for name, spec in ranges.items():
        if name in pinned:
            assert spec.contains(pinned[name]), f"{name}=={pinned[name]} is outside pyproject's {spec}"
        elif name != "triton":  # each torch build pins its own triton
            raise AssertionError(f"test extra {name} has no pin in {CONSTRAINTS.name}")
    assert "pytest" in pinned and "schemathesis" in pinned


def test_torch_is_not_capped() -> None:
    assert "torch" not in CONSTRAINTS.read_text().lower()
    assert not {"torch", "triton"} & set(pins())
