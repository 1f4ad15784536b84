"""deploy/prometheus checked by promtool, and a real Prometheus scraping a real server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import yaml

from service.local import free_port, stop_process
from tests.deploy.conftest import DEPLOY, infer_once, require_tool
from tests.integration.conftest import Server

PROMETHEUS = DEPLOY / "prometheus"
SCRAPE_WAIT_S = 30.0


def _promtool(*args: str) -> None:
    tool = require_tool("promtool")
    result = subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    _promtool("check", "config", "prometheus.yml")


def test_promtool_check_rules() -> None:
    _promtool("check", "rules", "alerts.yml")


def test_promtool_test_rules() -> None:
    _promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts == fires == quiet


def test_prometheus_scrapes_the_server(shipped_server: Server, tmp_path: Path) -> None:
    binary = require_tool("prometheus")
    # The shipped scrape config and rules, pointed at the test server and scraping every second.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [shipped_server.address]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(5):
            infer_once(shipped_server)
        api = f"http://127.0.0.1:{port}/api/v1"
        query = 'sum(gated_requests_total{job="gated-serve",outcome="success"})'
        value = _poll(api, query, at_least=5.0, process=process, log=log)
        assert value >= 5.0
        groups = httpx.get(f"{api}/rules", timeout=5.0).json()["data"]["groups"]
        assert sum(len(g["rules"]) for g in groups) == 6
    finally:
        stop_process(process, 20)


def _poll(
    api: str, query: str, at_least: float, process: subprocess.Popen[bytes], log: Path
) -> float:
    """The query's single value once it reaches ``at_least``, within SCRAPE_WAIT_S."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    value = -1.0
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            result = httpx.get(f"{api}/query", params={"query": query}, timeout=2.0).json()
            samples = result["data"]["result"]
            if samples:
                value = float(samples[0]["value"][1])
                if value >= at_least:
                    return value
        except (httpx.TransportError, ValueError, KeyError):
            pass  # Prometheus still starting.
        time.sleep(0.5)
    raise AssertionError(f"{query} = {value} after {SCRAPE_WAIT_S} s\n{log.read_text()}")
