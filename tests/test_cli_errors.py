"""Errors a user can cause, through the real ``moeserve`` command (subprocesses, no mocks): each is one line
on stderr, ``moeserve CMD: error: ...``, and exit code 1 (a bad cluster.toml: 2, as argparse's usage errors);
no traceback unless ``-v``. All are found before any weight is loaded, so each run takes about a second
(plus the import of torch)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeserve.coordinator.config import default_model_path

DEFAULT = default_model_path()


def moeserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeserve.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str, code: int = 1) -> str:
    """The process failed with ``code`` and printed exactly one line, naming the command and each needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"moeserve {command}"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def model_dir(tmp_path: Path, *files: str, config: dict | str | None = None) -> Path:
    """A model directory holding links to the embedded model's ``files``, and ``config`` as config.json."""
    out = tmp_path / "model"
    out.mkdir()
    for name in files:
        (out / name).symlink_to(DEFAULT / name)
    if config is not None:
        (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return out


def default_config(**changes) -> dict:
    return dict(json.loads((DEFAULT / "config.json").read_text()), **changes)


# ---- the model directory ----

def test_model_dir_that_does_not_exist(tmp_path: Path) -> None:
    one_line_error(moeserve("generate", "--model", str(tmp_path / "nope"), "hi"), "generate",
                   "does not exist", "--model")


def test_model_dir_without_config_json(tmp_path: Path) -> None:
    one_line_error(moeserve("bench", "--model", str(model_dir(tmp_path, "model.safetensors"))), "bench",
                   "no config.json")


def test_malformed_config_json(tmp_path: Path) -> None:
    ckpt = model_dir(tmp_path, "model.safetensors", "tokenizer.json", config="{not json")
    one_line_error(moeserve("generate", "--model", str(ckpt), "hi"), "generate", "config.json", "invalid JSON")


def test_config_that_is_not_deepseek(tmp_path: Path) -> None:
    ckpt = model_dir(tmp_path, "model.safetensors", "tokenizer.json", config=default_config(model_type="llama"))
    one_line_error(moeserve("serve", "--model", str(ckpt)), "serve", "model_type 'llama' is not supported")


def test_model_dir_without_weights(tmp_path: Path) -> None:
    ckpt = model_dir(tmp_path, "config.json", "tokenizer.json")
    one_line_error(moeserve("generate", "--model", str(ckpt), "hi"), "generate", "model.safetensors",
                   "--load-format dummy")


def test_missing_tokenizer_hints_skip_tokenizer_init(tmp_path: Path) -> None:
    ckpt = model_dir(tmp_path, "config.json", "model.safetensors")
    one_line_error(moeserve("serve", "--model", str(ckpt)), "serve", "tokenizer.json", "--skip-tokenizer-init")


# ---- layout, device, placement ----

def test_infeasible_layout(tmp_path: Path) -> None:
    # the embedded model has 4 attention heads: tp 3 cannot split them (found before any rank is spawned)
    one_line_error(moeserve("generate", "--pp", "1", "--tp", "3", "hi"), "generate", "tp 3",
                   "num_attention_heads (4) is not divisible by tp (3)", "moeserve plan")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_absent_device() -> None:
    one_line_error(moeserve("generate", "--device", "cuda", "hi"), "generate", "--device cuda", "--device cpu")


def test_bad_expert_placement_files(tmp_path: Path) -> None:
    one_line_error(moeserve("generate", "--expert-placement", str(tmp_path / "none.json"), "hi"), "generate",
                   "placement file", "No such file")
    bad = tmp_path / "placement.json"
    bad.write_text(json.dumps({"phy2log": [[0, 1]]}))  # the embedded model has 8 routed experts
    one_line_error(moeserve("generate", "--expert-placement", str(bad), "hi"), "generate",
                   "placement file", "logical experts placed on no rank: 2-7")


# ---- context, cache and store ----

def test_max_model_len_past_the_model_positions() -> None:
    # the embedded model has 512 positions; MOESERVE_ALLOW_LONG_MAX_MODEL_LEN=1 allows more (tests/test_cli.py)
    one_line_error(moeserve("generate", "--max-model-len", "100000", "hi"), "generate",
                   "--max-model-len 100000 is more than the model's max_position_embeddings (512)",
                   "MOESERVE_ALLOW_LONG_MAX_MODEL_LEN=1")


def test_kv_cache_memory_that_holds_no_block() -> None:
    # the embedded model in float32: 5 layers x 128 values x 4 bytes = 2560 bytes a token, 16 tokens a block
    for command, *rest in (("generate", "hi"), ("serve", "--port", "0", "--rpc-port", "0")):
        one_line_error(moeserve(command, "--kv-cache-memory", "1", *rest), command,
                       "--kv-cache-memory of 1 bytes holds no cache block", "give --kv-cache-memory 40960 or more")


def test_kv_store_url_with_a_bad_port() -> None:
    for port in ("notaport", "99999"):
        line = one_line_error(moeserve("generate", "--kv-store", f"redis://:s3cret@host:{port}/0", "hi"),
                              "generate", f"the port '{port}' is not a port number", "redis://:***@host")
        assert "s3cret" not in line  # the password is not echoed


# ---- serving ----

def test_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        one_line_error(moeserve("serve", "--port", port, "--rpc-port", "0"), "serve", f"--port {port}",
                       "in use")
        one_line_error(moeserve("serve", "--port", "0", "--rpc-port", port), "serve", f"--rpc-port {port}")


def test_chat_without_a_server() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one_line_error(moeserve("chat", "--url", f"http://127.0.0.1:{port}"), "chat", "cannot reach the server")


# ---- cluster.toml ----

@pytest.mark.parametrize("text, needle", [
    ("[cluster\nhosts = [", "Expected ']'"),
    ("[cluster]\nhosts = ['127.0.0.1']\nspeed = 3\n", "unknown [cluster] key(s) ['speed']"),
    ("[engine]\nwarp_drive = true\n", "[engine] has no setting 'warp_drive'"),
])
def test_bad_cluster_toml(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(text)
    one_line_error(moeserve("launch", "cluster", "--config", str(config), "hi"), "launch cluster", needle, code=2)


def test_cluster_toml_engine_value_of_the_wrong_type(tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text("[cluster]\nhosts = ['127.0.0.1']\nnode_rank = 0\n[engine]\ntp = 'two'\n")
    one_line_error(moeserve("launch", "cluster", "--config", str(config), "hi"), "launch cluster",
                   "[engine] tp = 'two' must be an integer", code=2)


# ---- -v ----

@pytest.mark.parametrize("before, after", [(["-v"], []), ([], ["-v"])])
def test_verbose_shows_the_traceback(tmp_path: Path, before: list[str], after: list[str]) -> None:
    proc = moeserve(*before, "generate", *after, "--model", str(tmp_path / "nope"), "hi")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("moeserve generate: error: model directory")
