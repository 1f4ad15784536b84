"""deploy/k8s and deploy/kserve: rendered overlays validated by kubernetes-validate (strict) for
built-in kinds and by the trimmed CRD schemas in deploy/schemas for custom resources."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import ENV_PREFIX, Settings
from tests.deploy.conftest import DEPLOY, require_tool
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


def _overlay(name: str) -> list[dict[str, Any]]:
    return render(DEPLOY / "k8s" / "overlays" / name)


def _kserve() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "kserve").glob("*.yaml"))]


def _by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents if d["kind"] == kind]
    return found


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
    document = _by_kind(_kserve(), "InferenceService")
    document["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    schema = json.loads((DEPLOY / "schemas" / "inferenceservice.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)


# --- what the manifests promise about the service -------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_drains_and_is_locked_down(overlay: str) -> None:
    documents = _overlay(overlay)
    config = _by_kind(documents, "ConfigMap")["data"]
    pod = _by_kind(documents, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert set(config) <= SETTINGS_ENV
    drain_s = float(config.get("GATED_DRAIN_TIMEOUT_S", Settings.model_fields[
        "drain_timeout_s"].default))
    pre_stop_s = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s
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


def test_kserve_runtime_serves_v2_from_mnt_models() -> None:
    documents = _kserve()
    runtime = _by_kind(documents, "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= SETTINGS_ENV
    assert env["GATED_MODEL_REPOSITORY"] == "/mnt/models"
    assert int(env["GATED_PORT"]) == container["ports"][0]["containerPort"] == 8080
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    model = _by_kind(documents, "InferenceService")["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"][
        "supportedModelFormats"]}


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
