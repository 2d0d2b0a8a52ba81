"""Expert load over HTTP, end to end against a real ``moeserve serve --tp 2`` (two gloo stage workers):
``/metrics`` series, ``GET /v1/expert_load``, ``moeserve expert-load``, a real Prometheus scraping the server
(Debian's ``prometheus``), ``promtool check rules`` and ``promtool test rules`` on deploy/, and the dashboard
in a real headless Chromium.

Set MOESERVE_UPDATE_SCREENSHOT=1 to write the dashboard's screenshot to docs/images/dashboard.png.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from expert_load_server import warmed_server

from moeserve.frontend.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
SERIES = re.compile(r'^moeserve_expert_tokens_total\{layer="(\d+)",rank="(\d+)"\} (\S+)$', re.M)


@pytest.fixture(scope="module")
def server():
    args = ["--tp", "2", "--kv-cache-memory", str(32 << 20), "--expert-load-interval", "2", "--num-redundant-experts", "2"]
    # some traffic: prefill and decode on both ranks
    with warmed_server(args, [f"the expert {i} counts" for i in range(6)], max_tokens=12) as url:
        yield url


def rank_series(url: str) -> dict[tuple[int, int], float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(int(layer), int(rank)): float(v) for layer, rank, v in SERIES.findall(text)}


def settled(url: str) -> tuple[dict, dict[tuple[int, int], float]]:
    """The expert-load JSON and the /metrics series once the engine is idle (the last window has closed: the
    counts stay the same over two seconds) and they agree."""
    deadline = time.monotonic() + 60
    previous = None
    while True:
        load = httpx.get(url + "/v1/expert_load", timeout=30).json()
        series = rank_series(url)
        got = {(layer, rank): float(v) for layer, ranks, loads in zip(load["layers"], load["ranks"], load["rank_load"])
               for rank, v in zip(ranks, loads)}
        if got == series == previous and sum(series.values()) > 0:
            return load, series
        assert time.monotonic() < deadline, (got, series)
        previous = series
        time.sleep(2)


def test_metrics_and_json_agree(server) -> None:
    load, series = settled(server)
    assert load["layers"] == [1, 2, 3, 4] and load["num_experts"] == 8
    assert {rank for _, rank in series} == {0, 1}  # both EP ranks of the one stage
    for row, ranks in zip(load["load"], load["rank_load"]):
        assert sum(row) == sum(ranks) > 0  # every routed pair is served by exactly one rank
        assert sum(row) % 2 == 0  # top_k = 2
    text = httpx.get(server + "/metrics", timeout=30).text
    assert "moeserve_ep_balancedness{layer=\"1\"}" in text
    assert "moeserve_eplb_steps_since_rebalance" in text
    assert re.search(r'moeserve_expert_tokens_by_expert_total\{expert="\d+",layer="4"\}|'
                     r'moeserve_expert_tokens_by_expert_total\{layer="4",expert="\d+"\}', text)
    bad = httpx.get(server + "/v1/expert_load?scope=yesterday", timeout=30)
    assert bad.status_code == 400 and "scope" in bad.json()["error"]["message"]


def test_expert_load_command_writes_safetensors(server, tmp_path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "load.safetensors"
    subprocess.run([sys.executable, "-m", "moeserve.launch.cli", "expert-load", "--url", server, "--out", str(out)],
                   check=True, timeout=120)
    tensors = load_file(str(out))
    load, _ = settled(server)
    assert tensors["load"].shape == (4, 8)
    assert tensors["load"].sum().item() >= sum(map(sum, load["load"]))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_alert_rules_pass_promtool() -> None:
    subprocess.run(["promtool", "check", "rules", str(RULES)], check=True, timeout=60)
    # their unit tests: the error-rate alert pages for the server's failures, not for a client's 4xx
    tests = RULES.with_name("alerts_test.yml")
    subprocess.run(["promtool", "test", "rules", str(tests)], check=True, timeout=60)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian package) is not installed")
def test_real_prometheus_scrapes_the_series(server, tmp_path) -> None:
    _, series = settled(server)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global: {{scrape_interval: 1s}}\nrule_files: [{RULES}]\nscrape_configs:\n"
                      f"  - job_name: moeserve\n    static_configs: [{{targets: ['{server.removeprefix('http://')}']}}]\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query"
        deadline = time.monotonic() + 90
        while True:
            try:
                result = httpx.get(api, params={"query": "moeserve_expert_tokens_total"}, timeout=5).json()
                if len(result["data"]["result"]) == len(series):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, "prometheus did not scrape the series in time"
            time.sleep(1)
        got = {(int(r["metric"]["layer"]), int(r["metric"]["rank"])): float(r["value"][1])
               for r in result["data"]["result"]}
        assert got == rank_series(server)
        rules = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).json()
        assert len(rules["data"]["groups"][0]["rules"]) == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    if shutil.which("chromium") is None or not Path("/usr/bin/chromedriver").exists():
        pytest.skip("chromium and chromium-driver (Debian packages) are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1500", f"--user-data-dir={tempfile.mkdtemp(prefix='moeserve-chromium-')}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    return webdriver.Chrome(options=options, service=service)


def test_dashboard_in_chromium_shows_the_metrics(server, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    settled(server)
    driver = chromium_driver()
    try:
        driver.get(server + "/dashboard")
        deadline = time.monotonic() + 60
        cells: dict[tuple[int, int], float] = {}
        while cells != rank_series(server):  # the page updates itself (server-sent events) until it agrees
            assert time.monotonic() < deadline, cells
            time.sleep(0.5)
            # one script reads every cell at once (the page redraws them at each event)
            cells = {(int(c[0]), int(c[1])): float(c[2]) for c in driver.execute_script(
                "return [...document.querySelectorAll('rect.rank-cell')].map(c => [c.dataset.layer, c.dataset.rank, "
                "c.dataset.count]);")}
        step = int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-step"))
        assert step > 0
        counts = driver.find_element(By.ID, "expert-map").get_attribute("data-counts")
        load = httpx.get(server + "/v1/expert_load", timeout=30).json()
        assert counts is not None and eval_json(counts) == load["load"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#hottest tbody tr")) == 10
        assert "rank 1:" in driver.find_element(By.ID, "placement").text
        # each layer its own placement and plan; every figure names its window
        # read in one script, as the cells are: an event between finding the blocks and reading one of them
        # redraws them, and the element found is gone (a stale element reference)
        layers, first_block = driver.execute_script(
            "const b = [...document.querySelectorAll('#placement .layer-placement')];"
            "return [b.map(e => e.dataset.layer), b.length ? b[0].innerText : ''];")
        assert [int(layer) for layer in layers] == load["layers"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#plan .layer-plan")) == len(load["layers"])
        assert "predicted" in driver.find_element(By.ID, "plan").text
        status = driver.find_element(By.ID, "status").text
        assert "latest window (" in status and "since start" in status, status
        assert "since its placement began" in first_block
        # the heat map labels its experts (every one, at this width) and both maps have a colour scale
        assert eval_json(driver.find_element(By.ID, "expert-map").get_attribute("data-expert-labels") or "[]") == \
            list(range(load["num_experts"]))
        assert int(driver.find_element(By.ID, "expert-scale-max").get_attribute("data-max") or 0) == \
            max(max(row) for row in load["load"])
        assert driver.execute_script(
            "return document.querySelectorAll('#rank-map text.rank-label')[1].textContent;") == "EP 1 (rank 1)"
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("MOESERVE_UPDATE_SCREENSHOT"):
            shutil.copy(shot, ROOT / "docs" / "images" / "dashboard.png")
    finally:
        driver.quit()


def test_admin_rebalance_keeps_the_tokens(server) -> None:
    """POST /admin/rebalance: the placement changes while serving, greedy text stays the same."""
    ask = {"model": "moeserve-default", "prompt": "the experts move", "max_tokens": 16, "temperature": 0}
    before_text = httpx.post(server + "/v1/completions", json=ask, timeout=120).json()["choices"][0]["text"]
    before, _ = settled(server)
    r = httpx.post(server + "/admin/rebalance", timeout=30)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 90
    while True:
        text = httpx.get(server + "/metrics", timeout=30).text
        done = re.findall(r'moeserve_eplb_rebalances_total\{result="(\w+)"\} (\S+)', text)
        if any(float(v) > 0 for _, v in done):
            break
        assert time.monotonic() < deadline, "no rebalance was recorded"
        time.sleep(0.5)
    results = {k: float(v) for k, v in done}
    after, _ = settled(server)
    assert results["failed"] == 0
    if results["applied"]:
        assert after["phy2log"] != before["phy2log"]
    after_text = httpx.post(server + "/v1/completions", json=ask, timeout=120).json()["choices"][0]["text"]
    assert after_text == before_text


def eval_json(text: str):
    import json

    return json.loads(text)


def test_expert_load_routes_need_the_api_key() -> None:
    """One process (no expert parallelism): the routes follow the API-key rule; the dashboard's also take
    ?key= (a browser's EventSource sends no header); /admin/rebalance says why it cannot run here."""
    from moeserve.coordinator.config import EngineConfig
    from moeserve.frontend.server_config import ServerConfig
    from moeserve.frontend.testing import BackgroundServer

    config = ServerConfig(engine=EngineConfig(kv_cache_memory=8 << 20), port=0, rpc_port=0, api_key="k1")
    with BackgroundServer(config) as s:
        bearer = {"Authorization": "Bearer k1"}
        for path in ("/v1/expert_load", "/dashboard", "/dashboard/assets/dashboard.js", "/dashboard/events"):
            assert httpx.get(s.http_url + path, timeout=30).status_code == 401, path
        assert httpx.get(s.http_url + "/dashboard?key=k2", timeout=30).status_code == 401
        page = httpx.get(s.http_url + "/dashboard?key=k1", timeout=30)
        assert page.status_code == 200 and "/dashboard/assets/dashboard.js?key=k1" in page.text
        assert httpx.get(s.http_url + "/dashboard/assets/dashboard.js?key=k1", timeout=30).status_code == 200
        assert httpx.get(s.http_url + "/dashboard/assets/..%2Fstate.py?key=k1", timeout=30).status_code == 404
        assert httpx.get(s.http_url + "/v1/expert_load?key=k1", timeout=30).status_code == 401  # header only
        load = httpx.get(s.http_url + "/v1/expert_load", headers=bearer, timeout=30).json()
        assert load["phy2log"] is None and len(load["load"]) == len(load["layers"])
        with httpx.stream("GET", s.http_url + "/dashboard/events?key=k1", timeout=30) as events:
            first = next(line for line in events.iter_lines() if line.startswith("data: "))
        assert '"layers"' in first
        refused = httpx.post(s.http_url + "/admin/rebalance", headers=bearer, timeout=30)
        assert refused.status_code == 400 and "expert parallelism" in refused.json()["error"]["message"]
        assert httpx.post(s.http_url + "/admin/rebalance", timeout=30).status_code == 401
