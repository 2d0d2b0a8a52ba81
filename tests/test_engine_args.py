"""The engine flags are made from EngineConfig's fields (launch/engine_args.py): every field but those the
command sets itself is a flag, the defaults give EngineConfig's, and parsed values come back as the config;
the Ray backend without Ray installed is a one-line UserError."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from moeserve.coordinator.config import EngineConfig
from moeserve.errors import UserError
from moeserve.launch.cli import build_parser
from moeserve.launch.engine_args import NOT_FLAGS, engine_config


def parse(*argv: str):
    return build_parser().parse_args(["generate", "x", *argv])


def test_every_field_is_a_flag_whose_default_is_the_fields(monkeypatch) -> None:
    monkeypatch.delenv("MOESERVE_KV_STORE", raising=False)
    args = vars(parse())
    for field in dataclasses.fields(EngineConfig):
        if field.name in NOT_FLAGS:
            assert field.name not in args
        elif field.name == "seed":
            assert args["seed"] is None  # the command line's runs are unseeded unless --seed is given
        else:
            assert args[field.name] == field.default, field.name
    assert engine_config(parse(), progress=False) == EngineConfig(seed=None)


def test_flags_come_back_as_the_config() -> None:
    config = engine_config(parse("--pp", "2", "--tp", "2", "--distributed-executor-backend", "ray",
                                 "--no-kv-load-cost-rule", "--keep-fp8", "--enforce-eager", "--seed", "3",
                                 "--eplb-threshold", "0.5"), progress=False)
    assert (config.pp, config.tp, config.distributed_executor_backend, config.kv_load_cost_rule,
            config.keep_fp8, config.enforce_eager, config.seed, config.eplb_threshold) == \
        (2, 2, "ray", False, True, True, 3, 0.5)
    with pytest.raises(SystemExit):
        parse("--distributed-executor-backend", "slurm")
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        EngineConfig(distributed_executor_backend="slurm")


def test_ray_backend_without_ray_is_a_user_error(monkeypatch) -> None:
    from moeserve.coordinator.engine_setup import default_launcher

    monkeypatch.setitem(sys.modules, "ray", None)  # any import of ray now fails
    monkeypatch.delitem(sys.modules, "moeserve.coordinator.ray_executor", raising=False)
    with pytest.raises(UserError, match=r"pip install 'moeserve\[ray\]'"):
        default_launcher(EngineConfig(pp=2, distributed_executor_backend="ray"))


def test_launch_cluster_refuses_the_ray_backend(capsys) -> None:
    """launch cluster starts every node's ranks itself: asking it for Ray actors is a one-line error, before
    any node joins."""
    from moeserve.launch.cli import main

    code = main(["launch", "cluster", "--nnodes", "1", "--node-rank", "0", "--master-addr", "127.0.0.1",
                 "--pp", "2", "--distributed-executor-backend", "ray", "--skip-tokenizer-init"])
    err = capsys.readouterr().err
    assert code == 1 and "moeserve serve --distributed-executor-backend ray" in err, err
