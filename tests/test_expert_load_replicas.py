"""Expert load of every replica: a replica process sends each new ``LoadView`` to the front end
(``load_view_codec``), which serves /metrics, /v1/expert_load and the dashboard per replica and summed.
End to end against a real ``moeserve serve --replicas 2 --tp 2`` (each replica an engine with two gloo
stage workers and its own EP placement), the dashboard in a real headless Chromium."""

from __future__ import annotations

import re
import time

import httpx
import msgpack
import pytest
import torch
from expert_load_server import warmed_server

from moeserve.coordinator.expert_load import LoadAggregator, sum_views
from moeserve.coordinator.load_view_codec import decode_view, encode_view

REPLICA_SERIES = re.compile(r'^moeserve_replica_expert_tokens_total\{replica="(\d+)",layer="(\d+)",rank="(\d+)"\} (\S+)$',
                            re.M)
SUMMED_SERIES = re.compile(r'^moeserve_expert_tokens_total\{layer="(\d+)",rank="(\d+)"\} (\S+)$', re.M)


def a_view(placement: list[list[int]], seed: int):
    gen = torch.Generator().manual_seed(seed)
    agg = LoadAggregator((1, 2), 4, torch.tensor(placement))
    agg.update(0, (1, 2), torch.randint(0, 9, (2, 2, 4), generator=gen), torch.randint(0, 9, (2, 2, 6), generator=gen))
    agg.close_window(3)
    agg.set_layer_placement(2, torch.tensor([[0, 1, 2], [3, 2, 0]]))
    agg.update(1, (1, 2), torch.randint(9, 19, (2, 2, 4), generator=gen), torch.randint(0, 9, (2, 2, 6), generator=gen))
    return agg.close_window(7)


def test_view_codec_round_trip() -> None:
    view = a_view([[0, 1, 3], [2, 3, 0]], 0)
    back = decode_view(msgpack.unpackb(msgpack.packb(encode_view(view), use_bin_type=True), raw=False))
    for name in ("total", "window", "physical_total", "physical_window", "phy2log", "rank_base"):
        assert torch.equal(getattr(back, name), getattr(view, name)), name
    assert back.layer_ids == view.layer_ids and back.rank_ids == view.rank_ids and back.history == view.history
    assert torch.equal(back.rank_load("total"), view.rank_load("total"))


@pytest.mark.parametrize("second", [[[0, 1, 3], [2, 3, 0]], [[1, 0, 3], [3, 2, 1]]], ids=["same", "different"])
def test_sum_of_replicas_keeps_each_ranks_total(second: list[list[int]]) -> None:
    a, b = a_view([[0, 1, 3], [2, 3, 0]], 0), a_view(second, 1)
    summed = sum_views([a, b])
    assert torch.equal(summed.total, a.total + b.total)
    assert torch.equal(summed.rank_load("total"), a.rank_load("total") + b.rank_load("total"))
    assert torch.equal(summed.rank_load("window"), a.rank_load("window") + b.rank_load("window"))
    assert (summed.phy2log is None) == (second != [[0, 1, 3], [2, 3, 0]])  # no one placement when they differ
    assert summed.num_ranks == 2


@pytest.fixture(scope="module")
def replicas():
    args = ["--replicas", "2", "--replica-threads", "1", "--tp", "2", "--num-redundant-experts", "2",
            "--kv-cache-memory", str(32 << 20), "--expert-load-interval", "2"]
    # distinct prompts: the prefix router spreads them over both replicas
    with warmed_server(args, [f"{i} replicas count their experts {i}" for i in range(8)], max_tokens=8) as url:
        yield url


def settled(url: str) -> tuple[list[dict], dict, str]:
    """Each replica's and the summed /v1/expert_load, and /metrics, once they stop changing and agree."""
    deadline = time.monotonic() + 90
    previous = None
    while True:
        per = [httpx.get(url + "/v1/expert_load", params={"replica": i}, timeout=30) for i in range(2)]
        summed = httpx.get(url + "/v1/expert_load", timeout=30)
        metrics = httpx.get(url + "/metrics", timeout=30).text
        if all(r.status_code == 200 for r in [*per, summed]):
            now = ([r.json()["load"] for r in per], summed.json()["load"], REPLICA_SERIES.findall(metrics))
            if now == previous and all(sum(map(sum, load)) > 0 for load in now[0]):
                return [r.json() for r in per], summed.json(), metrics
            previous = now
        assert time.monotonic() < deadline, [r.text[:200] for r in [*per, summed]]
        time.sleep(1.5)


def test_every_replica_reaches_json_and_metrics(replicas) -> None:
    per, summed, metrics = settled(replicas)
    assert summed["replicas"] == summed["replicas_reporting"] == 2 and summed["replica"] is None
    for a, b, s in zip(per[0]["load"], per[1]["load"], summed["load"]):
        assert [x + y for x, y in zip(a, b)] == s
    for a, b, s in zip(per[0]["rank_load"], per[1]["rank_load"], summed["rank_load"]):
        assert [x + y for x, y in zip(a, b)] == s
    series = {(int(rep), int(layer), int(rank)): float(v) for rep, layer, rank, v in REPLICA_SERIES.findall(metrics)}
    for i, body in enumerate(per):
        assert body["replica"] == i and body["phy2log"] is not None  # each replica its own EP placement
        got = {(layer, rank): series[i, layer, rank] for layer, ranks in zip(body["layers"], body["ranks"])
               for rank in ranks}
        assert got == {(layer, rank): float(v) for layer, ranks, loads in
                       zip(body["layers"], body["ranks"], body["rank_load"]) for rank, v in zip(ranks, loads)}
    total = {(int(layer), int(rank)): float(v) for layer, rank, v in SUMMED_SERIES.findall(metrics)}
    assert total == {(layer, rank): float(v) for layer, ranks, loads in
                     zip(summed["layers"], summed["ranks"], summed["rank_load"]) for rank, v in zip(ranks, loads)}
    assert re.search(r'moeserve_replica_ep_balancedness\{(layer="1",replica="1"|replica="1",layer="1")\}', metrics)
    assert httpx.get(replicas + "/v1/expert_load", params={"replica": 2}, timeout=30).status_code == 400


def test_dashboard_offers_every_replica_and_their_sum(replicas) -> None:
    from test_expert_load_http import chromium_driver  # skips where chromium is not installed

    per, summed, _ = settled(replicas)
    driver = chromium_driver()
    try:
        driver.get(replicas + "/dashboard")
        deadline = time.monotonic() + 60
        while driver.execute_script("return document.body.dataset.replicas") != "3":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        labels = driver.execute_script("return [...document.querySelectorAll('#replica option')].map(o => o.textContent)")
        assert labels == ["all 2 replicas (summed)", "replica 0", "replica 1"]
        counts = driver.execute_script("return JSON.parse(document.getElementById('expert-map').dataset.counts)")
        assert counts == summed["load"]
        driver.execute_script("const s = document.getElementById('replica'); s.value = '2'; s.onchange();")
        counts = driver.execute_script("return JSON.parse(document.getElementById('expert-map').dataset.counts)")
        assert counts == per[1]["load"]
        assert "replica 1" in driver.find_element("id", "status").text
    finally:
        driver.quit()


def test_admin_rebalance_reaches_the_replicas(replicas) -> None:
    settled(replicas)
    assert httpx.post(replicas + "/admin/rebalance", timeout=30).status_code == 202
    deadline = time.monotonic() + 90
    while True:  # each replica's engine plans at its next idle moment and reports it with its next view
        rebalances = httpx.get(replicas + "/v1/expert_load", params={"replica": 1}, timeout=30).json()
        metrics = httpx.get(replicas + "/metrics", timeout=30).text
        done = dict(re.findall(r'moeserve_eplb_rebalances_total\{result="([\w-]+)"\} (\S+)', metrics))
        if float(done.get("applied", 0)) + float(done.get("skipped", 0)) >= 2:
            break
        assert time.monotonic() < deadline, (done, rebalances)
        time.sleep(1)
    assert float(done["failed"]) == 0
