"""Async scheduling, forced on on the CPU (float32): step N+1 is scheduled and launched before step N's
outputs are processed, and its decode tokens come from step N's sampled ids on the device. A client must
see nothing of it: every request's stream of outputs (tokens, text deltas, logprobs, finish reason, usage)
equals the synchronous engine's -- with EOS, stop ids and strings, max_tokens, min_tokens, logprobs, seeded
sampling, preemption, aborts, mixed prefill + decode steps, and requests that need synchronous steps."""

from __future__ import annotations

import asyncio

import pytest
import test_engine  # noqa: E402  (tests/ is on sys.path via conftest)
import torch
from test_engine import LENGTHS, budget, greedy, make_engine, prompts

from moeserve.coordinator.engine import Engine
from moeserve.coordinator.request import Request
from moeserve.coordinator.sampling import SamplingParams
from moeserve.coordinator.scheduler import ScheduledRequest, SchedulerOutput
from moeserve.coordinator.step_batch import PHASES, StepBatch, build_step_plan
from moeserve.kvstore.cache_manager import BlockTable
from moeserve.stages.step_plan import StepPlan, fill_pending

Arrival = tuple[int, str, list[int], SamplingParams]  # (step, request id, prompt ids, params)


@pytest.fixture(scope="module")
def ckpt(ckpt_factory):
    return ckpt_factory(test_engine.VARIANT)


@pytest.fixture(scope="module")
def alone(ckpt):
    """Each prompt alone, synchronously: its greedy tokens and text."""
    engine = make_engine(ckpt)
    return [engine.generate([p], greedy(n))[0] for p, (_, n) in zip(prompts(), LENGTHS)]


def run(engine: Engine, arrivals: list[Arrival], aborts: dict[int, str] | None = None) -> dict[str, list[tuple]]:
    """Add each request before its step, abort at the given steps; every output each request streamed,
    its logprobs last (``same``)."""
    pending, aborts = sorted(arrivals, key=lambda a: a[0]), dict(aborts or {})
    streams: dict[str, list[tuple]] = {a[1]: [] for a in arrivals}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, ids, params = pending.pop(0)
            engine.add_request(rid, prompt_token_ids=ids, params=params)
        if step in aborts:
            engine.abort(aborts[step])
        for o in engine.step():
            streams[o.request_id].append((
                o.new_token_ids, o.text_delta, o.finished, o.finish_reason, o.num_prompt_tokens,
                o.num_output_tokens, o.output_token_ids, o.output_text,
                None if o.top_logprobs is None else [list(t) for t in o.top_logprobs],
                (o.logprobs, None if o.top_logprobs is None else [list(t.values()) for t in o.top_logprobs])))
        step += 1
        assert step < 1000
    assert not engine.requests and engine.kv.num_free_blocks == engine.kv.num_blocks
    return streams


def same(got: dict[str, list[tuple]], expected: dict[str, list[tuple]]) -> bool:
    """Streams equal: everything exactly, but logprobs to 1e-4 (another batch's shapes may change them in
    the last float32 bits; the tokens never), NaN where neither run computed them (greedy tokens of requests
    that did not ask)."""
    assert {k: [out[:-1] for out in v] for k, v in got.items()} == \
        {k: [out[:-1] for out in v] for k, v in expected.items()}
    for rid, outs in got.items():
        for out, ref in zip(outs, expected[rid]):
            assert out[-1][0] == pytest.approx(ref[-1][0], abs=1e-4, nan_ok=True)
            for row, ref_row in zip(out[-1][1] or [], ref[-1][1] or []):
                assert row == pytest.approx(ref_row, abs=1e-4)
    return True


def both(ckpt, arrivals: list[Arrival], aborts: dict[int, str] | None = None, **kw) -> tuple[dict, dict, Engine]:
    sync = make_engine(ckpt, async_scheduling=False, **kw)
    overlapped = make_engine(ckpt, async_scheduling=True, **kw)
    assert not sync.async_scheduling and overlapped.async_scheduling
    return run(sync, arrivals, aborts), run(overlapped, arrivals, aborts), overlapped


def mixed_arrivals(alone) -> list[Arrival]:
    """Staggered requests that stop every way there is (EOS is token ``eos``: see ``with_eos``)."""
    p, out = prompts(), [a.output_token_ids for a in alone]
    return [
        (0, "len", p[0], greedy(LENGTHS[0][1])),
        (0, "eos", p[1], SamplingParams(max_tokens=12, temperature=0.0)),  # stops at the EOS of with_eos
        (1, "stop-id", p[2], SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True,
                                            stop_token_ids=(out[2][3],))),
        (2, "min-tokens", p[3], SamplingParams(max_tokens=25, temperature=0.0, min_tokens=6, ignore_eos=True,
                                               stop_token_ids=(out[3][1],))),
        (2, "logprobs", p[4], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=3)),
        (4, "seeded", p[5], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)),
        (5, "stop-str", p[6], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True,
                                             stop=(alone[6].output_text[3:6],))),
        (6, "one", p[0][:3], greedy(1)),
    ]


def with_eos(engine: Engine, token: int) -> Engine:
    engine.outputs.eos_token_ids = (token,)  # the EOS that stop checks and min_tokens blocking read
    return engine


@pytest.mark.parametrize("token_budget", [8, 64])
def test_streams_equal_synchronous(ckpt, alone, token_budget: int) -> None:
    arrivals = mixed_arrivals(alone)
    eos = alone[1].output_token_ids[4]
    sync = with_eos(make_engine(ckpt, async_scheduling=False, max_num_batched_tokens=token_budget), eos)
    overlapped = with_eos(make_engine(ckpt, async_scheduling=True, max_num_batched_tokens=token_budget), eos)
    expected, got = run(sync, arrivals), run(overlapped, arrivals)
    assert same(got, expected)
    reasons = {rid: s[-1][3] for rid, s in got.items() if rid != "min-tokens"}
    assert reasons == {"len": "length", "eos": "stop", "stop-id": "stop", "logprobs": "length",
                       "seeded": "length", "stop-str": "stop", "one": "length"}
    out = [a.output_token_ids for a in alone]
    assert got["eos"][-1][5] == out[1].index(eos) + 1  # the EOS (or stop id) is the last output
    assert got["stop-id"][-1][5] == out[2].index(out[2][3]) + 1
    assert got["min-tokens"][-1][5] >= 6
    assert got["len"][-1][6] == alone[0].output_token_ids  # and the tokens are the lone request's


def test_preemption_streams_equal(ckpt, alone) -> None:
    arrivals = [(2 * i, f"r{i}", p, greedy(n)) for i, (p, (_, n)) in enumerate(zip(prompts(), LENGTHS))]
    expected, got, engine = both(ckpt, arrivals, kv_cache_memory=budget(24))
    assert engine.stats.num_preemptions > 0
    assert same(got, expected)
    assert [got[f"r{i}"][-1][6] for i in range(len(LENGTHS))] == [a.output_token_ids for a in alone]


def test_abort_in_flight(ckpt, alone) -> None:
    """An abort between steps: the request streams nothing more, its blocks are freed, the others are
    unchanged (the aborted one may have had one token fewer when the abort came: outputs lag a step)."""
    arrivals = [(0, f"r{i}", p, greedy(n)) for i, (p, (_, n)) in enumerate(zip(prompts()[:4], LENGTHS[:4]))]
    for at in (3, 4, 6):
        expected, got, _ = both(ckpt, arrivals, aborts={at: "r3"})
        assert same({k: v for k, v in got.items() if k != "r3"}, {k: v for k, v in expected.items() if k != "r3"})
        tokens = [t for out in got["r3"] for t in out[0]]
        assert tokens == alone[3].output_token_ids[:len(tokens)] and not any(out[2] for out in got["r3"])
        assert len(expected["r3"]) - 1 <= len(got["r3"]) <= len(expected["r3"])


def test_requests_that_need_sync_steps(ckpt, alone) -> None:
    """A request with penalties arrives mid-stream: the engine finishes the batch in flight, steps
    synchronously while it runs, and overlaps again after it."""
    p = prompts()
    arrivals = [(0, "a", p[0], greedy(20)), (0, "b", p[3], greedy(25)),
                (3, "pen", p[1], SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3,
                                                frequency_penalty=0.5, ignore_eos=True))]
    expected, got, engine = both(ckpt, arrivals)
    assert same(got, expected)
    assert got["a"][-1][6] == alone[0].output_token_ids


def test_no_token_computed_past_max_tokens(ckpt) -> None:
    """A request sure to stop at the token in flight (max_tokens) is not scheduled again: with only such
    stops, async scheduling computes exactly the tokens the synchronous engine does."""
    rows = {}
    for mode in (False, True):
        engine = make_engine(ckpt, async_scheduling=mode)
        seen = rows[mode] = [0]
        submit = engine.executor.submit

        def counting(plan, prev=None, submit=submit, seen=seen):
            seen[0] += len(plan.token_ids)
            return submit(plan, prev)

        engine.executor.submit = counting  # type: ignore[method-assign]
        engine.generate(prompts()[:5], [greedy(n) for _, n in LENGTHS[:5]])
    assert rows[True] == rows[False]


def test_phases_timed_by_name(ckpt) -> None:
    engine = make_engine(ckpt, async_scheduling=True)
    engine.generate(prompts()[:2], greedy(4))
    assert tuple(engine.stats.phase_s) == PHASES
    assert all(engine.stats.phase_s[p] > 0 for p in ("schedule", "launch", "sample", "advance", "process"))


def test_async_stream_and_expert_trace(ckpt) -> None:
    """Through AsyncEngine (the server's path): streams equal the synchronous engine's, and a request
    that traces its experts gets one trace per token (tracing steps synchronously)."""
    from moeserve.coordinator.async_engine import AsyncEngine

    async def main() -> list[tuple[list[int], int]]:
        async with AsyncEngine(make_engine(ckpt, async_scheduling=True)) as engine:
            async def one(i: int) -> tuple[list[int], int]:
                tokens, traces = [], 0
                async for u in engine.stream(f"a{i}", prompts()[i], greedy(8), trace_experts=i == 1):
                    tokens += u.output.new_token_ids
                    traces += len(u.expert_ids or [])
                return tokens, traces
            return await asyncio.gather(*(one(i) for i in range(3)))

    got = asyncio.run(main())
    ref = make_engine(ckpt).generate(prompts()[:3], greedy(8))
    assert [g[0] for g in got] == [r.output_token_ids for r in ref]
    assert [g[1] for g in got] == [0, 8, 0]


# ---- the plan's placeholders, as pure functions ----
def _sched(reqs: list[tuple[Request, int]]) -> SchedulerOutput:
    return SchedulerOutput([ScheduledRequest(r, n, BlockTable((i,))) for i, (r, n) in enumerate(reqs)])


def test_plan_marks_tokens_still_on_the_device() -> None:
    params = greedy(8)
    a, b, c = (Request(x, [5, 6, 7], params) for x in "abc")
    for r in (a, b):  # computed their prompt; one token each sampled by the batch in flight
        r.num_computed_tokens, r.num_output_placeholders = 3, 1
    c.num_computed_tokens = 1  # a prefill chunk: every token known
    prev = StepBatch(_sched([]), StepPlan([], [], [], [], []), [b, a], sampled_reqs=[b, a])
    plan = build_step_plan(_sched([(a, 1), (b, 1), (c, 2)]), prev)
    assert plan.token_ids == [0, 0, 6, 7] and plan.query_lens == [1, 1, 2]
    assert plan.pending_rows == [0, 1] and plan.pending_src == [1, 0]  # a was row 1 of the batch before
    assert plan.sample_rows == [0, 1, 2]
    ids = torch.tensor(plan.token_ids)
    fill_pending(ids, plan, torch.tensor([41, 40]))
    assert ids.tolist() == [40, 41, 6, 7]
    ids = torch.tensor([0, 0, 9])
    fill_pending(ids, StepPlan([0, 0, 9], [1, 1, 1], [3, 3, 3], [[0]] * 3, [0, 1, 2], [0, 1], [0, 1]),
                 torch.tensor([7, 8, 99]))  # rows 0..k-1 from rows 0..k-1: a plain copy
    assert ids.tolist() == [7, 8, 9]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streams_equal_synchronous_on_cuda(ckpt, alone) -> None:
    """The same streams on a GPU (float32, fused kernels and CUDA graphs where they apply): the pinned
    copies, the double-buffered graph inputs and the placeholders written into them on the device."""
    arrivals = mixed_arrivals(alone)
    eos = alone[1].output_token_ids[4]
    cuda = dict(device="cuda", dtype="float32", block_size=16, kv_cache_memory=8 << 20)
    sync = with_eos(make_engine(ckpt, async_scheduling=False, **cuda), eos)
    overlapped = with_eos(make_engine(ckpt, async_scheduling=True, **cuda), eos)
    assert same(run(overlapped, arrivals), run(sync, arrivals))
