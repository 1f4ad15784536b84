"""deploy/k8s and deploy/kserve: rendered overlays validated by kubernetes-validate (strict) for
built-in kinds and by the trimmed CRD schemas in deploy/schemas for custom resources."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.app import FINAL_STOP_S
from service.settings import ENV_PREFIX, Settings, load_settings
from tests.deploy.conftest import DEPLOY, image_env, require_tool
from tests.deploy.kustomize import KustomizeError, apply_operation, render

OVERLAYS = ("cpu", "gpu")
# Kubernetes versions checked: a widely deployed one and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.30.0", "1.37.0")
SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.schema.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.schema.json",
}
SETTINGS_ENV = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
GRPC_PORT_ENV = f"{ENV_PREFIX}GRPC_PORT"
# The manifests may name the gRPC port setting before service/settings.py has it (the server
# ignores unknown GATED_* variables); test_grpc_port_is_a_server_setting checks it against
# Settings as soon as Settings has a gRPC field.
MANIFEST_ENV = SETTINGS_ENV | {GRPC_PORT_ENV}
REST_RUNTIME, GRPC_RUNTIME = "gated-serve", "gated-serve-grpc"


def _overlay(name: str) -> list[dict[str, Any]]:
    return render(DEPLOY / "k8s" / "overlays" / name)


def _kserve() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "kserve").glob("*.yaml"))]


def _by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents if d["kind"] == kind]
    return found


def _named(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's literal ``env`` values (secret references left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _target(port: dict[str, Any], container_ports: dict[str, int]) -> int:
    """The container port number a Service port's targetPort (a name or a number) selects."""
    target = port["targetPort"]
    return container_ports[target] if isinstance(target, str) else int(target)


def _is_custom(document: dict[str, Any]) -> bool:
    return (document["apiVersion"], document["kind"]) in SCHEMAS


# --- the renderer the other tests trust ---------------------------------------------------------

def test_renderer_applies_add_replace_remove() -> None:
    doc: dict[str, Any] = {"a": {"list": [1, 2], "x": 1}}
    apply_operation(doc, {"op": "add", "path": "/a/list/-", "value": 3})
    apply_operation(doc, {"op": "add", "path": "/a/list/0", "value": 0})
    apply_operation(doc, {"op": "add", "path": "/a/n~1m", "value": "slash"})
    apply_operation(doc, {"op": "replace", "path": "/a/x", "value": 2})
    apply_operation(doc, {"op": "remove", "path": "/a/list/1"})
    assert doc == {"a": {"list": [0, 2, 3], "x": 2, "n/m": "slash"}}


@pytest.mark.parametrize("operation", [
    {"op": "replace", "path": "/a/missing", "value": 1},
    {"op": "add", "path": "/missing/child", "value": 1},
    {"op": "remove", "path": "/a/list/5"},
    {"op": "move", "path": "/a/x", "from": "/a/y"},
])
def test_renderer_refuses_what_it_cannot_apply(operation: dict[str, Any]) -> None:
    with pytest.raises(KustomizeError):
        apply_operation({"a": {"list": [1], "x": 1}}, operation)


def test_renderer_refuses_unsupported_kustomization_fields(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)


# --- validation by real tools ------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_builtin_kinds_pass_kubernetes_validate_strict(tmp_path: Path, version: str) -> None:
    tool = require_tool("kubernetes-validate")
    files = []
    for overlay in OVERLAYS:
        for i, document in enumerate(d for d in _overlay(overlay) if not _is_custom(d)):
            path = tmp_path / f"{overlay}-{i}-{document['kind'].lower()}.yaml"
            path.write_text(yaml.safe_dump(document))
            files.append(str(path))
    result = subprocess.run(
        [tool, "--strict", "--kubernetes-version", version, *files],
        capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A kind it has no schema for is only a warning: make sure every file was really checked.
    assert output.count(" passed for resource ") == len(files), output


@pytest.mark.parametrize("source", [*OVERLAYS, "kserve"])
def test_custom_resources_match_their_crd_schemas(source: str) -> None:
    documents = _kserve() if source == "kserve" else _overlay(source)
    custom = [d for d in documents if _is_custom(d)]
    assert custom
    for document in custom:
        schema_file = SCHEMAS[(document["apiVersion"], document["kind"])]
        schema = json.loads((DEPLOY / "schemas" / schema_file).read_text())
        jsonschema.validate(document, schema)


def test_every_kind_is_validated() -> None:
    # kserve/ holds only custom resources; the overlays' built-in kinds go through
    # kubernetes-validate above. Anything else would slip through both checks.
    assert all(_is_custom(d) for d in _kserve())
    kinds = {d["kind"] for d in _overlay("cpu")}
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "ServiceMonitor"}


def test_crd_schemas_reject_a_misspelt_field() -> None:
    document = _named(_kserve(), "InferenceService", "mnist1d-conv")
    document["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    schema = json.loads((DEPLOY / "schemas" / "inferenceservice.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)


def test_crd_schemas_reject_an_unknown_protocol() -> None:
    runtime = _named(_kserve(), "ServingRuntime", GRPC_RUNTIME)
    runtime["spec"]["protocolVersions"] = ["grpc"]
    schema = json.loads((DEPLOY / "schemas" / "servingruntime.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(runtime, schema)
    service = _named(_kserve(), "InferenceService", "mnist1d-conv-grpc")
    service["spec"]["predictor"]["model"]["protocolVersion"] = "grpc-v3"
    schema = json.loads((DEPLOY / "schemas" / "inferenceservice.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, schema)


# --- what the manifests promise about the service -------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_drains_and_is_locked_down(overlay: str) -> None:
    documents = _overlay(overlay)
    config = _by_kind(documents, "ConfigMap")["data"]
    pod = _by_kind(documents, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert set(config) <= MANIFEST_ENV
    assert pod["terminationGracePeriodSeconds"] >= _stop_budget_s(container, config)
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    token = next(e for e in container["env"] if e["name"] == "GATED_ADMIN_TOKEN")
    assert "secretKeyRef" in token["valueFrom"]
    assert container["envFrom"][0]["configMapRef"]["name"] == _by_kind(
        documents, "ConfigMap")["metadata"]["name"]


# Kubernetes' terminationGracePeriodSeconds when a pod spec does not set it.
DEFAULT_GRACE_S = 30


def _setting_s(env: dict[str, str], name: str) -> float:
    return float(env.get(f"{ENV_PREFIX}{name.upper()}", Settings.model_fields[name].default))


def _stop_budget_s(container: dict[str, Any], env: dict[str, str]) -> float:
    """Seconds from the kubelet's preStop to the process's exit, at worst: the preStop sleep,
    the drain timeout, the HTTP server's shutdown timeout and the final stops of the batchers
    and of gRPC (service/settings.py documents the sum)."""
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
    command = pre_stop.get("command", [])
    pre_stop_s = float(command[-1]) if command[:1] == ["sleep"] else 0.0
    return (pre_stop_s + _setting_s(env, "drain_timeout_s")
            + _setting_s(env, "shutdown_timeout_s") + 2 * FINAL_STOP_S)


def test_every_deploy_file_stops_within_its_grace_period() -> None:
    """A SIGTERM's drain and shutdown end before the orchestrator's SIGKILL, everywhere."""
    checked = []
    for overlay in OVERLAYS:
        documents = _overlay(overlay)
        pod = _by_kind(documents, "Deployment")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {**_by_kind(documents, "ConfigMap")["data"], **_env(container)}
        budget = _stop_budget_s(container, env)
        assert budget <= pod["terminationGracePeriodSeconds"], (overlay, budget)
        checked.append(overlay)
    documents = _kserve()
    runtimes = {d["metadata"]["name"]: d["spec"] for d in documents
                if d["kind"] == "ServingRuntime"}
    for name, runtime in runtimes.items():
        (container,) = runtime["containers"]
        budget = _stop_budget_s(container, _env(container))
        # An InferenceService of the runtime that sets no grace period gets Kubernetes' 30 s.
        assert budget <= DEFAULT_GRACE_S, (name, budget)
        for service in documents:
            if service["kind"] == "InferenceService" and (
                service["spec"]["predictor"]["model"]["runtime"] == name
            ):
                grace = service["spec"]["predictor"].get(
                    "terminationGracePeriodSeconds", DEFAULT_GRACE_S)
                assert budget <= grace, (service["metadata"]["name"], budget, grace)
                checked.append(service["metadata"]["name"])
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["gated-serve"]
    grace_s = float(re.fullmatch(r"(\d+)s", compose["stop_grace_period"]).group(1))  # type: ignore[union-attr]
    env = {k: str(v) for k, v in compose.get("environment", {}).items()}
    assert _stop_budget_s({}, env) <= grace_s
    assert len(checked) == 4


def test_gpu_overlay_requests_a_gpu_and_tolerates_gpu_nodes() -> None:
    documents = _overlay("gpu")
    pod = _by_kind(documents, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"]
    assert _by_kind(documents, "ConfigMap")["data"]["GATED_DEVICE"] == "cuda"
    assert "tolerations" not in _by_kind(_overlay("cpu"), "Deployment")["spec"]["template"][
        "spec"]


def test_service_monitor_and_hpa_point_at_the_deployment() -> None:
    documents = _overlay("cpu")
    labels = _by_kind(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _by_kind(documents, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = _by_kind(documents, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    hpa = _by_kind(documents, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _by_kind(documents, "Deployment")[
        "metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_and_service_expose_rest_and_grpc(overlay: str) -> None:
    documents = _overlay(overlay)
    (container,) = _by_kind(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    assert {p["protocol"] for p in container["ports"]} == {"TCP"}
    # The server listens where the container says: the image's ENV, overridden by the
    # ConfigMap (envFrom), overridden by the container's own env.
    env = image_env() | _by_kind(documents, "ConfigMap")["data"] | _env(container)
    assert int(env["GATED_PORT"]) == ports["http"]
    assert int(env[GRPC_PORT_ENV]) == ports["grpc"]
    service = {p["name"]: p for p in _by_kind(documents, "Service")["spec"]["ports"]}
    assert set(service) == {"http", "grpc"}
    assert service["http"]["port"] == _target(service["http"], ports) == 8000
    grpc = service["grpc"]
    assert grpc["port"] == _target(grpc, ports) == 8001
    assert grpc["protocol"] == "TCP"
    # Istio picks the protocol from appProtocol or from a `<protocol>[-<suffix>]` port name.
    assert grpc["appProtocol"] == "grpc"
    assert re.fullmatch(r"grpc(-[a-z0-9-]+)?", grpc["name"])
    # Health stays on REST, the source of truth; gRPC Health reports the same state.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"


def test_grpc_port_is_a_server_setting() -> None:
    grpc_fields = [name for name in Settings.model_fields if "grpc" in name]
    if not grpc_fields:
        pytest.skip("service/settings.py has no gRPC setting yet")
    assert GRPC_PORT_ENV in SETTINGS_ENV, grpc_fields
    assert Settings.model_fields["grpc_port"].default == int(image_env()[GRPC_PORT_ENV]) == 8001
    assert load_settings(grpc_port=0).grpc_port == 0  # the REST-only KServe runtime's value


def test_kserve_has_a_rest_and_a_grpc_variant() -> None:
    assert {(d["kind"], d["metadata"]["name"]) for d in _kserve()} == {
        ("ServingRuntime", REST_RUNTIME), ("ServingRuntime", GRPC_RUNTIME),
        ("InferenceService", "mnist1d-conv"), ("InferenceService", "mnist1d-conv-grpc")}


@pytest.mark.parametrize("name", [REST_RUNTIME, GRPC_RUNTIME])
def test_kserve_runtimes_serve_from_mnt_models_on_one_port(name: str) -> None:
    runtime = _named(_kserve(), "ServingRuntime", name)
    (container,) = runtime["spec"]["containers"]
    env = _env(container)
    assert set(env) <= MANIFEST_ENV
    assert env["GATED_MODEL_REPOSITORY"] == "/mnt/models"
    # Knative (serverless mode) routes exactly one port per container.
    assert len(container["ports"]) == 1
    # Both variants probe REST readiness, which answers 503 while loading and draining.
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/v2/health/ready"
    assert probe["port"] == int(env["GATED_PORT"]) == 8080


def test_kserve_rest_runtime_serves_v2_on_8080_without_grpc() -> None:
    runtime = _named(_kserve(), "ServingRuntime", REST_RUNTIME)
    (container,) = runtime["spec"]["containers"]
    env = _env(container)
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["GATED_PORT"]) == 8080
    assert port.get("name", "http1") == "http1"
    assert env[GRPC_PORT_ENV] == "0"  # unreachable through Knative, so off


def test_kserve_grpc_runtime_serves_grpc_v2_on_an_h2c_port() -> None:
    runtime = _named(_kserve(), "ServingRuntime", GRPC_RUNTIME)
    (container,) = runtime["spec"]["containers"]
    env = _env(container)
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    (port,) = container["ports"]
    # Knative proxies HTTP/2 end to end only to a port named h2c; 8081 is KServe's gRPC port.
    assert port == {"name": "h2c", "containerPort": 8081, "protocol": "TCP"}
    assert int(env[GRPC_PORT_ENV]) == port["containerPort"]
    assert int(env["GATED_PORT"]) != port["containerPort"]
    rest = _named(_kserve(), "ServingRuntime", REST_RUNTIME)["spec"]["containers"][0]
    assert container["image"] == rest["image"]


def test_kserve_inference_services_use_a_runtime_of_their_protocol() -> None:
    documents = _kserve()
    runtimes = {d["metadata"]["name"]: d["spec"] for d in documents
                if d["kind"] == "ServingRuntime"}
    models = {d["metadata"]["name"]: d["spec"]["predictor"]["model"] for d in documents
              if d["kind"] == "InferenceService"}
    assert {m["protocolVersion"]: m["runtime"] for m in models.values()} == {
        "v2": REST_RUNTIME, "grpc-v2": GRPC_RUNTIME}
    for model in models.values():
        runtime = runtimes[model["runtime"]]
        assert model["protocolVersion"] in runtime["protocolVersions"]
        assert model["modelFormat"]["name"] in {f["name"] for f in runtime[
            "supportedModelFormats"]}
    # The same repository behind both, so a model has the same name on either protocol.
    assert len({m["storageUri"] for m in models.values()}) == 1


def test_kserve_auto_selection_is_unambiguous() -> None:
    # An InferenceService that names no runtime gets the one auto-selectable runtime of its
    # format and protocolVersion: each pair must have exactly one.
    pairs = [(f["name"], protocol)
             for d in _kserve() if d["kind"] == "ServingRuntime"
             for f in d["spec"]["supportedModelFormats"] if f.get("autoSelect")
             for protocol in d["spec"]["protocolVersions"]]
    assert sorted(pairs) == [("gated", "grpc-v2"), ("gated", "v2")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(overlay: str) -> None:
    # A cross-check of the renderer where a recent kubectl happens to be installed. CI does not
    # install one (Debian's kubernetes-client is 1.20, whose kustomize predates inline
    # `patches`), so this test skips there instead of failing.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; optional cross-check of tests/deploy/kustomize.py")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr

    def key(document: dict[str, Any]) -> tuple[str, str]:
        return document["kind"], document["metadata"]["name"]

    expected = sorted(yaml.safe_load_all(result.stdout), key=key)
    assert sorted(_overlay(overlay), key=key) == expected
