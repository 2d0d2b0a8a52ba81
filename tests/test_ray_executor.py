"""``--distributed-executor-backend ray`` on a real two-node Ray cluster on this machine (Ray's
``cluster_utils``: a head and one more node, 2 logical CPUs each, shared by every test of this module):
every layout gives the mp executor's greedy tokens (CPU float32), a Ray actor killed mid-run fails the step
with a WorkerError naming the rank and its node, ``moeserve serve`` on Ray fails its requests and exits when
a rank's actor dies, and no actor of ours is left alive after any of them. Skipped, with the reason, where
Ray (the ``moeserve[ray]`` extra) is not installed."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'moeserve[ray]'): Ray executor untested")

import test_distributed_engine  # noqa: E402  (tests/ is on sys.path: conftest.py)
import test_engine  # noqa: E402
import test_self_healing  # noqa: E402
from test_frontend_serve import LONG, sse_until_done, start  # noqa: E402

from moeserve.coordinator import ray_actor  # noqa: E402
from moeserve.coordinator.config import EngineConfig  # noqa: E402
from moeserve.coordinator.engine import Engine  # noqa: E402
from moeserve.coordinator.executor import WorkerError  # noqa: E402
from moeserve.coordinator.ray_actor import NAMESPACE  # noqa: E402
from moeserve.coordinator.ray_cluster import RankPlace  # noqa: E402
from moeserve.coordinator.sampling import SamplingParams  # noqa: E402

VARIANT = test_distributed_engine.VARIANT
REPO = str(Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on this machine; this process is connected as a driver. The nodes' worker processes
    import moeserve from this checkout (PYTHONPATH), as the ranks of the other executors do."""
    from ray.cluster_utils import Cluster

    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + ([old_path] if old_path else []))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def config(ckpt: Path, **fields) -> EngineConfig:
    return EngineConfig(model=str(ckpt), block_size=4, kv_cache_memory=1 << 22, **fields)


def our_live_actors(wait_s: float = 15.0) -> list[dict]:
    """moeserve's actors still alive, once the kills sent have landed (polled up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def mp_tokens(ckpt_factory) -> list[list[int]]:
    """The mp executor's tokens for pp = 2 x tp = 2 with ep = 2: every layout gives these (test_distributed_engine
    shows the same for one process)."""
    return test_distributed_engine.run(ckpt_factory(VARIANT), pp=2, tp=2, ep=2)


@pytest.mark.parametrize("pp, tp, ep", [(2, 1, 1), (1, 2, 1), (2, 2, 2)])
def test_ray_layout_equals_mp(ray_cluster, ckpt_factory, mp_tokens, pp: int, tp: int, ep: int) -> None:
    """The ranks are Ray actors, the tp ranks of a stage on one node (with pp = 2 x tp = 2 each stage fills
    one of the two nodes), each loads the plan's share, and the tokens are the mp executor's. Where the driver
    placed each rank (read from the placement groups, before the actors were up) is where its actor reports
    it runs, and the ranks met at the driver's rendezvous store (the one they all found listening)."""
    engine = Engine(config(ckpt_factory(VARIANT), pp=pp, tp=tp, ep=ep, max_num_seqs=8, max_num_batched_tokens=32,
                           distributed_executor_backend="ray"))
    try:
        nodes = [p.node_id for p in engine.executor.places]
        stages = [{nodes[r] for r in range(s * tp, (s + 1) * tp)} for s in range(pp)]
        assert all(len(s) == 1 for s in stages), nodes
        if pp * tp == 4:
            assert stages[0] != stages[1], nodes
        assert len(our_live_actors(0)) == pp * tp
        executor = engine.executor
        assert executor.places == [RankPlace(*w) for w in ray.get([a.where.remote() for a in executor.actors])]
        assert {s.init_method for s in executor.specs} == {f"tcp://{ray.util.get_node_ip_address()}:"
                                                           f"{executor.rendezvous_store.port}"}
        assert engine.executor.loaded_bytes == {r: w.total for r, w in enumerate(engine.parallel_plan.rank_weights)}
        results = test_engine.run_staggered(engine)
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
    finally:
        engine.close()
    assert [results[i] for i in range(len(test_engine.LENGTHS))] == mp_tokens
    assert our_live_actors() == []


def test_prestarted_actors_are_taken_over_and_give_the_same_tokens(ray_cluster, ckpt_factory, mp_tokens) -> None:
    """``prestart`` (what ``moeserve serve`` calls before loading the server) starts one replica's actors ahead:
    the executor of that layout takes them over (its replica id, no new actor) and the tokens are the mp
    executor's. Actors started for another layout are killed, and the executor starts its own."""
    from moeserve.comm.topology import ParallelDims

    dims = ParallelDims(pp=2, tp=2, ep=2)
    kw = dict(pp=2, tp=2, ep=2, max_num_seqs=8, max_num_batched_tokens=32, distributed_executor_backend="ray")
    ray_actor.prestart(dims, "cpu")
    early = ray_actor._prestarted
    assert early is not None and early.done.wait(30) and early.error is None
    ahead = {a["name"] for a in our_live_actors(0)}
    assert len(ahead) == 4 and all(early.replica_id in name for name in ahead)
    engine = Engine(config(ckpt_factory(VARIANT), **kw))
    try:
        assert engine.executor.replica_id == early.replica_id and ray_actor._prestarted is None
        assert {a["name"] for a in our_live_actors(0)} == ahead  # the same actors, none added
        results = test_engine.run_staggered(engine)
    finally:
        engine.close()
    assert [results[i] for i in range(len(test_engine.LENGTHS))] == mp_tokens
    assert our_live_actors() == []

    ray_actor.prestart(ParallelDims(pp=1, tp=2, ep=1), "cpu")  # not the layout asked for next
    other = ray_actor._prestarted
    assert other is not None and other.done.wait(30)
    engine = Engine(config(ckpt_factory(VARIANT), **kw))
    try:
        assert engine.executor.replica_id != other.replica_id
        assert all(other.replica_id not in a["name"] for a in our_live_actors())  # killed
    finally:
        engine.close()
    assert our_live_actors() == []


def test_killed_actor_fails_the_step_naming_rank_and_node(ray_cluster, ckpt_factory) -> None:
    engine = Engine(config(ckpt_factory(VARIANT), pp=2, distributed_executor_backend="ray"))
    try:
        engine.add_request("a", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=50, temperature=0))
        engine.step()
        ray.kill(engine.executor.actors[1])
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1 \(node \d+: .*Ray node .*\): its Ray actor died") as e:
            for _ in range(50):
                engine.step()
        assert e.value.killed and time.monotonic() - t0 < 30  # a bound against a hang, not a speed test
    finally:
        engine.close()
    assert our_live_actors() == []


def test_serve_on_ray_fails_requests_and_exits_when_an_actor_dies(ray_cluster) -> None:
    """``moeserve serve --distributed-executor-backend ray --max-restarts 0`` joins the cluster of RAY_ADDRESS;
    killing a rank's actor while a stream runs ends the stream with engine_error naming the rank, /health
    turns 503, and the server exits 1 leaving no actor behind."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    proc, url, _ = start("--pp", "2", "--distributed-executor-backend", "ray", "--max-restarts", "0", env=env)
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as sse:
            lines = sse.iter_lines()
            assert next(lines).startswith("data: ")  # a token: the request runs
            (rank1,) = [a["name"] for a in our_live_actors(0) if a["name"].endswith("-rank-1")]
            ray.kill(ray.get_actor(rank1, namespace=NAMESPACE))
            chunks = sse_until_done(lines)
        assert chunks[-1]["error"]["code"] == "engine_error" and "rank 1" in chunks[-1]["error"]["message"]
        assert httpx.get(url + "/health", timeout=5).status_code == 503
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert our_live_actors() == []


def test_serve_on_ray_stops_on_sigterm_cleanly(ray_cluster) -> None:
    """SIGTERM, the way a server is stopped, drains and exits 0 with the actors it started ahead, and leaves
    no actor behind."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    proc, url, _ = start("--pp", "2", "--distributed-executor-backend", "ray", env=env)
    try:
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert our_live_actors() == []


def test_killed_actor_is_replaced_and_every_request_gets_its_tokens(ray_cluster, ckpt_factory) -> None:
    """Self-healing on Ray: the engine loop replaces a killed actor (every rank gets a new actor in the same
    placement groups) and every request gets the tokens of the mp executor without the fault."""
    ckpt = ckpt_factory(VARIANT)
    reference = test_self_healing.drive(ckpt, [], pp=2)[0]
    got, driver = test_self_healing.drive(ckpt, [6], lambda e: ray.kill(e.executor.actors[-1]), pp=2,
                                          distributed_executor_backend="ray")
    assert got == reference and driver.snapshot.rank_restarts == {f"1/{driver.engine.executor.specs[1].node}": 1}
    assert our_live_actors() == []


def test_generate_without_ray_address_starts_a_local_ray(ray_cluster) -> None:
    """``moeserve generate`` with no RAY_ADDRESS starts a Ray of its own for the run (and stops it): greedy
    tokens as one process's, on the embedded model."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "moeserve.launch.cli", "generate", "--temperature", "0", "--max-tokens", "8",
            "--json", "--kv-cache-memory", str(32 << 20), "def fib(n):"]
    ray_run = subprocess.run(argv + ["--pp", "2", "--distributed-executor-backend", "ray"], env=env,
                             capture_output=True, text=True, timeout=300)
    one = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert ray_run.returncode == 0 and one.returncode == 0, ray_run.stderr[-3000:] + one.stderr[-2000:]
    assert json.loads(ray_run.stdout)["token_ids"] == json.loads(one.stdout)["token_ids"]
    assert our_live_actors(0) == []  # its actors were in its own Ray, which it stopped; none here either


def test_node_that_dies_fails_the_step_naming_rank_and_node(ray_cluster, ckpt_factory) -> None:
    """The non-head node goes (its raylet and every process on it killed): the ranks it held fail the step,
    named with their node. Last in the module: the node is added back for nothing after it."""
    engine = Engine(config(ckpt_factory(VARIANT), pp=2, tp=2, ep=2, distributed_executor_backend="ray"))
    try:
        (worker_node,) = ray_cluster.worker_nodes
        lost = [r for r, p in enumerate(engine.executor.places) if p.node_id == worker_node.node_id]
        assert len(lost) == 2, engine.executor.places
        engine.add_request("a", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=50, temperature=0))
        engine.step()
        ray_cluster.remove_node(worker_node, allow_graceful=False)
        with pytest.raises(WorkerError, match=rf"rank [{lost[0]}{lost[1]}] \(node \d+: .*\): its Ray actor died"):
            for _ in range(50):
                engine.step()
    finally:
        engine.close()
    assert our_live_actors() == []


def test_forwarded_env_reaches_the_rank_before_it_joins(ray_cluster, ckpt_factory, monkeypatch) -> None:
    """The coordinator's network settings travel with the actor's constructor and are set before the rank
    joins torch.distributed: a GLOO_SOCKET_IFNAME naming no interface fails the start (gloo finds no address
    for it; the same start without it succeeds in every other test here), and leaves no actor behind."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuchif0")
    with pytest.raises(WorkerError, match=r"rank \d .*(exited with code 1|nosuchif0)"):
        Engine(config(ckpt_factory(VARIANT), pp=2, distributed_executor_backend="ray"))
    assert our_live_actors() == []


class RankFromThisModule(ray_actor.MoeserveRank):
    """The rank's actor class, from a module the Ray nodes cannot import (tests/ is not on their path)."""


def test_actor_that_cannot_start_fails_the_start_naming_it(ray_cluster, ckpt_factory, monkeypatch) -> None:
    """An actor whose class does not load on its node (moeserve missing there, or another version) fails the
    start with a WorkerError that names the rank and says so, and no actor is left behind."""
    monkeypatch.setattr(ray_actor, "MoeserveRank", RankFromThisModule)
    with pytest.raises(WorkerError, match=r"rank \d .*: its Ray actor could not start \(.*test_ray_executor"):
        Engine(config(ckpt_factory(VARIANT), pp=2, distributed_executor_backend="ray"))
    assert our_live_actors() == []
