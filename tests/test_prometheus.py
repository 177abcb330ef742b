"""A real Prometheus scrapes broker and API with the repository's scrape config, and every query of
the repository's Grafana dashboard returns data."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.helpers import TINY_MODEL, wait_for_models
from tests.processes import ROOT, free_port, stop
from tests.test_openai_api import Api

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (`make prometheus` installs "
                                                           "Debian's as root)")
SECRET = "sk-dashboard-5ecret"
DASHBOARD_RANGE = "1m"  # what Grafana's $__rate_interval becomes here


def scrape_config(broker_port: int, api_port: int) -> dict:
    """deploy/prometheus.yml with this test's ports, scraped every second."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    ports = {"tokenbus-broker": broker_port, "tokenbus-api": api_port}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(ports), f"the scrape config's jobs changed: {sorted(jobs)}"
    for name, port in ports.items():
        jobs[name]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    return config


def dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tokenbus.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert queries, "the dashboard has no queries"
    return [query.replace("$__rate_interval", DASHBOARD_RANGE) for query in queries]


def query(url: str, expr: str) -> list:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}",
                                timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, check, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: nothing after {timeout} s")
        time.sleep(0.5)


@pytest.fixture
def prometheus(stack, tmp_path):
    """Broker (with metrics), worker and API (with a keys file), scraped by Prometheus; yields
    (Prometheus URL, API)."""
    broker_port = free_port()
    stack.broker("--metrics-port", str(broker_port))
    stack.worker()
    asyncio.run(wait_for_models(stack.address, {TINY_MODEL}))
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.dashboard]\nsecret = "{SECRET}"\nmodels = ["{TINY_MODEL}"]\n')
    api = Api(stack.address, "--keys-file", str(keys)).wait()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(broker_port, api.port)))
    port = free_port()
    logs = ROOT / "test-artifacts" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"prometheus-{time.monotonic_ns()}.log", "wb") as log:
        process = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", api
    finally:
        stop(process)
        api.stop()


def test_every_dashboard_query_returns_data(prometheus):
    url, api = prometheus
    client = api.client(SECRET)
    messages = [{"role": "user", "content": "Tell me about the sea and the sky, at some length."}]
    for _ in range(3):  # the same prompt again: prefix cache hits
        client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8)
        with client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8,
                                            stream=True) as stream:
            list(stream)
    status = urllib.request.Request(api.url + "/v1/chat/completions", data=json.dumps(
        {"model": "not-allowed", "messages": messages}).encode(), headers={
        "Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:  # an error for the per-key errors panel
        urllib.request.urlopen(status, timeout=30)
    assert error.value.code == 403

    def targets_up() -> bool:
        with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=10) as response:
            active = json.loads(response.read())["data"]["activeTargets"]
        return len(active) == 2 and all(target["health"] == "up" for target in active)

    wait_for("both targets up", lambda: _answers(url) and targets_up())
    empty = []
    for expr in dashboard_queries():
        try:
            wait_for(expr, lambda: query(url, expr), timeout=60)
        except TimeoutError:
            empty.append(expr)
    assert not empty, f"dashboard queries without data: {empty}"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
