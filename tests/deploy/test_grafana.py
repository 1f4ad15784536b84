"""deploy/grafana and deploy/compose.yaml: the dashboard queries only metrics the server exposes,
and the local stack mounts files that exist and publishes the server's REST and gRPC ports."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY, image_env, image_exposed_ports, metric_samples
from tests.deploy.kustomize import render
from tests.integration.conftest import Server

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gated-serve.json"
METRIC = re.compile(r"\bgated_[a-z0-9_]+")


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return exprs


def test_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    uids = {d["uid"] for d in datasources}
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert {t["datasource"]["uid"] for t in panel["targets"]} <= uids


def test_dashboard_covers_the_required_panels() -> None:
    used = {m for q in _queries(_dashboard()) for m in METRIC.findall(q)}
    for family in ("gated_requests_total", "gated_request_duration_seconds_bucket",
                   "gated_compute_duration_seconds_bucket", "gated_queue_depth",
                   "gated_batch_size_bucket", "gated_request_active_channel_ratio_bucket",
                   "gated_request_flops_ratio_bucket", "gated_layer_active_channel_ratio_sum",
                   "gated_gate_mode_switches_total"):
        assert family in used


def test_queried_metrics_exist_on_the_server(shipped_server: Server) -> None:
    exposed = metric_samples(shipped_server)
    used = {m for q in _queries(_dashboard()) for m in METRIC.findall(q)}
    assert used
    assert used <= exposed, sorted(used - exposed)
    # The HPA's custom metric and every alert expression's metrics exist too.
    hpa = next(d for d in render(DEPLOY / "k8s" / "base")
               if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exposed
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    in_alerts = {m for g in rules["groups"] for r in g["rules"] for m in METRIC.findall(r["expr"])}
    assert in_alerts <= exposed, sorted(in_alerts - exposed)


def test_compose_mounts_existing_files() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gated-serve", "prometheus", "grafana"}
    assert (DEPLOY / services["gated-serve"]["build"]["context"] / "Dockerfile").is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["gated-serve:8000"]


def test_compose_publishes_rest_and_grpc() -> None:
    server = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["gated-serve"]
    assert server["ports"] == ["8000:8000", "8001:8001"]
    # The container side of each mapping is a port the image exposes and the server binds.
    published = {int(mapping.rsplit(":", 1)[1]) for mapping in server["ports"]}
    assert published == image_exposed_ports()
    env = image_env() | {k: str(v) for k, v in server.get("environment", {}).items()}
    assert {int(env["GATED_PORT"]), int(env["GATED_GRPC_PORT"])} == published
