"""End to end through the real ``moeserve`` command (subprocesses, no mocks)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import oracle_reference

from moeserve.coordinator.config import default_model_path
from moeserve.launch.cli import HelpFormatter, build_parser, subparsers
from moeserve.model.tokenizer import Tokenizer


def moeserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeserve.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_json_matches_reference(ckpt_factory) -> None:
    ckpt = ckpt_factory("v2_qlora_group_yarn")
    prompts = ["def heapify(x):", "héllo wörld", "import json"]
    proc = moeserve("generate", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "12",
                    "--ignore-eos", "--json", *prompts)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["prompt"] for d in lines] == prompts  # one line per prompt, in input order
    tok = Tokenizer.from_dir(ckpt)
    for d in lines:
        _, ref = oracle_reference.reference_outputs(ckpt, tok.encode(d["prompt"]), 12)
        assert d["token_ids"] == ref
        assert d["text"] == tok.decode(ref)


def test_generate_prompts_file_and_seed(ckpt_factory, tmp_path: Path) -> None:
    ckpt = ckpt_factory("v3_noaux_norm")
    file = tmp_path / "prompts.txt"
    file.write_text("def f(x):\n\nclass A:\n")
    args = ["generate", "--model", str(ckpt), "--prompts-file", str(file), "--max-tokens", "8", "--json",
            "--temperature", "1.0", "--seed", "11", "--ignore-eos"]
    a, b = moeserve(*args), moeserve(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # the seed makes sampling reproducible
    assert [json.loads(line)["prompt"] for line in a.stdout.splitlines()] == ["def f(x):", "class A:"]


def test_generate_unseeded_differs_between_runs() -> None:
    # --help: the seed defaults to unseeded, i.e. a fresh one each run (--seed makes runs equal: above)
    args = ["generate", "--temperature", "1.0", "--max-tokens", "24", "--ignore-eos", "--json", "def f(x):",
            "import os", "class A:"]
    a, b = moeserve(*args), moeserve(*args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout != b.stdout


def test_max_model_len_past_the_positions_with_the_override(ckpt_factory) -> None:
    """MOESERVE_ALLOW_LONG_MAX_MODEL_LEN=1 lets --max-model-len pass max_position_embeddings (512 here; without
    it: tests/test_cli_errors.py): generation goes past position 512 (the rotary tables are built 1024 long)
    and one warning says which RoPE scaling applies."""
    env = dict(os.environ, MOESERVE_ALLOW_LONG_MAX_MODEL_LEN="1")
    for model, note in ((default_model_path(), "no RoPE scaling (rope type default), so none applies"),
                        (ckpt_factory("v2_qlora_group_yarn"), "RoPE scaling is yarn, factor 4 (from 128 to 512")):
        tok, prompt = Tokenizer.from_dir(model), "def f(x):\n"
        while len(tok.encode(prompt)) < 500:
            prompt += "    return x + 1\n"
        proc = subprocess.run([sys.executable, "-m", "moeserve.launch.cli", "generate", "--model", str(model),
                               "--max-model-len", "1024", "--max-tokens", "40", "--ignore-eos", "--temperature", "0",
                               "--json", prompt], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)["token_ids"]) == 40  # positions 500.. past 540
        warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
        assert len(warnings) == 1 and note in warnings[0], proc.stderr


def test_generate_streams_text_in_order(ckpt_factory) -> None:
    ckpt = ckpt_factory("v3_noaux_norm")
    proc = moeserve("generate", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "6", "AAA", "BBB")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.index("AAA") < proc.stdout.index("BBB")


def test_generate_default_model_prints_code() -> None:
    proc = moeserve("generate", "--temperature", "0", "--max-tokens", "24", "--json", "def fib(n):")
    assert proc.returncode == 0, proc.stderr
    text = json.loads(proc.stdout)["text"]
    # the embedded model was trained on Python sources: its greedy continuation of a def is indented code
    assert text.startswith("\n    ") and len(text.strip()) > 10


def test_bad_request_is_a_clear_error(ckpt_factory) -> None:
    ckpt = ckpt_factory("v3_noaux_norm")
    proc = moeserve("generate", "--model", str(ckpt), "--max-tokens", "100000", "hi")
    assert proc.returncode != 0
    assert "exceeds the model's context length 512" in proc.stderr
    proc = moeserve("generate", "--model", str(ckpt), "--top-p", "0", "hi")
    assert proc.returncode != 0 and "top_p" in proc.stderr


def test_check(ckpt_factory, tmp_path: Path) -> None:
    proc = moeserve("check", "--model", str(ckpt_factory("v3_noaux_norm")))
    assert proc.returncode == 0, proc.stderr
    for key in ("torch", "cuda", "npu", "distributed", "gloo", "zeromq", "model_type", "deepseek_v3", "supported"):
        assert key in proc.stdout
    cfg = json.loads((ckpt_factory("v3_noaux_norm") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, scoring_func="relu")))
    shutil.copy(ckpt_factory("v3_noaux_norm") / "model.safetensors", tmp_path / "model.safetensors")
    bad = moeserve("check", "--model", str(tmp_path))
    assert bad.returncode == 1
    assert "supported" in bad.stdout and "no:" in bad.stdout and "scoring_func 'relu'" in bad.stdout


def test_bench_writes_json(ckpt_factory, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = moeserve("bench", "--model", str(ckpt_factory("v3_noaux_norm")), "--num-prompts", "6",
                    "--input-len", "16", "--output-len", "8", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for key in ("output_tokens_per_s", "total_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s",
                "itl_p99_s", "peak_memory_bytes"):
        assert result[key] > 0, key
    assert "output tokens/s" in proc.stdout


def test_generate_spawns_local_ranks(ckpt_factory) -> None:
    ckpt = str(ckpt_factory("v3_noshared"))
    base = ["generate", "--model", ckpt, "--temperature", "0", "--max-tokens", "10", "--ignore-eos", "--json",
            "def f(x):", "import os"]
    single = moeserve(*base)
    split = moeserve(*base, "--pp", "2", "--tp", "2", "--ep", "2")
    assert single.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == single.stdout


def test_launch_cluster_node_that_cannot_reach_node0() -> None:
    """A node started without node 0 fails after --join-timeout with one clear line, no C++ stack trace."""
    proc = moeserve("launch", "cluster", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                    "--master-port", "29991", "--join-timeout", "2", "x", timeout=60)
    assert proc.returncode == 1
    assert "node 1 could not reach node 0 at 127.0.0.1:29991 within 2 s" in proc.stderr
    assert "frame #" not in proc.stderr
    assert "network settings: none" in proc.stderr


def test_every_option_has_help_and_shows_its_default() -> None:
    parsers = subparsers(build_parser())
    assert {p.prog for p in parsers} >= {"moeserve generate", "moeserve serve", "moeserve launch cluster",
                                          "moeserve bench", "moeserve plan", "moeserve check", "moeserve chat"}
    for parser in parsers:
        parser.format_help()  # renders (a stray % in a help text would raise here)
        formatter = HelpFormatter(parser.prog)
        for action in parser._actions:
            if not action.option_strings or action.default == argparse.SUPPRESS:
                continue  # positionals, -h and subcommand choosers
            assert action.help, f"{parser.prog} {action.option_strings[-1]} has no help"
            text = formatter._expand_help(action)
            assert "default" in text, f"{parser.prog} {action.option_strings[-1]}: {text!r} shows no default"


def test_generate_help_shows_the_sampling_defaults() -> None:
    proc = moeserve("generate", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "sampling temperature; 0 = greedy (default: 0.8)" in text
    assert "--max-tokens MAX_TOKENS tokens to generate per prompt, at most (default: 64)" in text
