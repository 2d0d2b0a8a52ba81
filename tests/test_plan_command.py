"""``moeserve plan`` through the real command: the layout table and JSON, FP8 routed experts as the device keeps
them, and the dtype a run on the device would use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeserve.launch import cli

V3_CONFIG_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "deepseek_v3"


def moeserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeserve.launch.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_plan_command() -> None:
    ok = moeserve("plan", "--pp", "2", "--tp", "1", "--ep", "1")
    assert ok.returncode == 0, ok.stderr
    assert "pp 2 x tp 1 (ep 1) = 2 rank(s)" in ok.stdout
    assert "0-2" in ok.stdout and "3-4" in ok.stdout and "0-7" in ok.stdout  # stages and experts
    bad = moeserve("plan", "--tp", "3")
    assert bad.returncode == 1 and "num_attention_heads (4) is not divisible by tp (3)" in bad.stderr


def test_plan_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--pp", "2", "--tp", "2", "--kv-cache-memory", "1000000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in out["stages"]] == [[0, 3], [3, 5]]
    assert [r["experts"] for r in out["ranks"]] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert out["kv_capacity_tokens"] == 1_000_000 // (3 * 128 * 4)  # float32, as a CPU run holds it
    assert cli.main(["plan", "--pp-layers", "3,2"]) == 1  # one stage given two counts


def test_plan_counts_in_the_dtype_of_the_run() -> None:
    """A CPU run holds float32 weights and cache, an accelerator bfloat16 (dtype auto): plan counts the same."""
    from moeserve.coordinator.config import EngineConfig
    from moeserve.model.loader import load_model

    def plan(*args: str) -> dict:
        proc = moeserve("plan", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    cpu, cuda, bf16 = plan(), plan("--device", "cuda"), plan("--dtype", "bfloat16")
    config = EngineConfig()  # what generate and serve run on the CPU by default
    model = load_model(config.model_path, config.torch_dtype, config.torch_device)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cpu["dtype_bytes"] == config.torch_dtype.itemsize == 4
    assert abs(cpu["total_weight_bytes"] - held) < 0.01 * held
    assert cuda["dtype_bytes"] == bf16["dtype_bytes"] == 2 and cuda["total_weight_bytes"] < 0.51 * held


def test_plan_command_fp8(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", str(V3_CONFIG_DIR), "--tp", "8", "--ep", "8", "--memory-per-rank", "141GB"]
    assert cli.main([*args, "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "routed experts FP8" in out and "kv capacity per replica" in out
    assert cli.main([*args, "--device", "cuda", "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)["ranks"]
    assert all(80e9 < r["weight_bytes"] < 95e9 for r in ranks)
    assert cli.main(args) == 1  # on cpu the experts are not kept FP8: 170 GB per rank
    assert "more than memory_per_rank = 141000000000 bytes" in capsys.readouterr().err
