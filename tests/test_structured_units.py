"""Structured output inside the engine, without a server: the sampler's grammar mask touches only the
constrained rows, a spec's ``after`` holds the grammar back until its text has been generated, and bad specs
are typed errors."""

from __future__ import annotations

import json

import pytest
import torch

from moeserve.coordinator.config import default_model_path
from moeserve.coordinator.outputs import OutputProcessor
from moeserve.coordinator.request import Request, RequestError
from moeserve.coordinator.sampling import Sampler, SamplingParams, SamplingParamsError, make_sampling_batch
from moeserve.coordinator.structured import StructuredOutputError, compile_spec, unpack_bitmask
from moeserve.model.tokenizer import Tokenizer


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """[R, V] bool -> [R, ceil(V/32)] int32, bit t % 32 of word t // 32."""
    r, v = allowed.shape
    words = (v + 31) // 32
    bits = torch.zeros(r, words * 32, dtype=torch.int64)
    bits[:, :v] = allowed.long()
    packed = (bits.view(r, words, 32) << torch.arange(32)).sum(-1)
    return packed.to(torch.int64).where(packed < 2**31, packed - 2**32).to(torch.int32)


def test_bitmask_masks_only_constrained_rows() -> None:
    torch.manual_seed(0)
    vocab, rows = 70, 6
    logits = torch.randn(rows, vocab)
    allowed = torch.rand(2, vocab) < 0.2
    allowed[:, 5] = True
    assert torch.equal(unpack_bitmask(_pack(allowed), vocab), allowed)
    params = [SamplingParams(temperature=0.8, seed=i) for i in range(rows)]

    def run(mask):
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        batch = make_sampling_batch(params, [[]] * rows, [[1]] * rows, gens, "cpu", token_bitmask=mask)
        return Sampler().sample(logits, batch).token_ids

    free, masked = run(None), run((torch.tensor([1, 4]), _pack(allowed)))
    assert allowed[0, masked[1]] and allowed[1, masked[4]]
    keep = [0, 2, 3, 5]
    assert torch.equal(free[keep], masked[keep])  # unconstrained rows draw exactly as without the mask


def test_after_holds_the_grammar_back_until_its_text() -> None:
    tok = Tokenizer.from_dir(default_model_path())
    out = OutputProcessor(tok, tok.eos_token_ids, 4096)
    spec = json.dumps({"type": "regex", "pattern": "[0-9]+", "after": "END"})
    req = Request("r", tok.encode("x"), SamplingParams(max_tokens=50, structured_output=spec))
    req.detokenizer = out.detokenizer(req.prompt_token_ids)
    out.grammar(req)
    for t in tok.encode("free text E", add_bos=False):
        assert out.bitmask([req]) is None  # not constrained yet
        out.process(req, t, 0.0, None, 0.0, 512)
    out.process(req, tok.encode("ND", add_bos=False)[0], 0.0, None, 0.0, 512)
    if req.grammar_after is not None:  # "ND" may take two tokens
        out.process(req, tok.encode("ND", add_bos=False)[1], 0.0, None, 0.0, 512)
    rows, mask = out.bitmask([req])
    allowed = unpack_bitmask(mask, 4096)[0]
    digits = {tok.encode(d, add_bos=False)[0] for d in "0123456789"}
    assert all(allowed[d] for d in digits) and not allowed[tok.encode("a", add_bos=False)[0]]


def test_bad_specs_are_typed_errors() -> None:
    with pytest.raises(SamplingParamsError, match="structured_output"):
        SamplingParams(structured_output={"type": "json_object"})  # type: ignore[arg-type]
    for bad, why in [("{", "not valid JSON"), ('{"type": "xml"}', "one of the types"),
                     ('{"type": "json_schema", "schema": {"type": "nope"}}', "nope"),
                     ('{"type": "regex", "pattern": "("}', "cannot be compiled")]:
        with pytest.raises(StructuredOutputError, match=why):
            compile_spec(bad)
    tok = Tokenizer.from_dir(default_model_path())
    req = Request("r", [1], SamplingParams(structured_output='{"type": "regex", "pattern": "("}'))
    with pytest.raises(RequestError, match="structured_output"):
        OutputProcessor(tok, tok.eos_token_ids, 4096).grammar(req)


def test_chat_prints_reasoning_dimmed_apart_from_the_answer() -> None:
    import io

    from moeserve.launch.cmd_chat import ReplyPrinter

    out = io.StringIO()
    p = ReplyPrinter(out, color=True)
    for kind, text in [("reasoning", "let me "), ("reasoning", "think"), ("content", ""), ("content", "42")]:
        p.write(kind, text)
    p.end()
    assert out.getvalue() == "\x1b[2mlet me think\x1b[0m\n42\n" and p.answer == ["42"]
    out = io.StringIO()
    p = ReplyPrinter(out, color=False)
    p.write("content", "plain")
    p.end()
    assert out.getvalue() == "plain\n"


def test_bitmask_on_inference_logits() -> None:
    """The engine's logits come out of inference mode; masking them in place must work."""
    with torch.inference_mode():
        logits = torch.randn(3, 40)
    allowed = torch.zeros(1, 40, dtype=torch.bool)
    allowed[0, 7] = True
    batch = make_sampling_batch([SamplingParams(temperature=0.0)] * 3, [[]] * 3, [[1]] * 3, [None] * 3, "cpu",
                                token_bitmask=(torch.tensor([2]), _pack(allowed)))
    assert Sampler().sample(logits, batch).token_ids[2] == 7


def test_bitmask_on_every_row() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    allowed = torch.rand(3, 50) < 0.3
    allowed[:, 0] = True
    batch = make_sampling_batch([SamplingParams(temperature=1.0, seed=i) for i in range(3)], [[]] * 3, [[1]] * 3,
                                [torch.Generator().manual_seed(i) for i in range(3)], "cpu",
                                token_bitmask=(torch.arange(3), _pack(allowed)))
    ids = Sampler().sample(logits, batch).token_ids
    assert all(allowed[i, ids[i]] for i in range(3))
