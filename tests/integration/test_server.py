"""End to end on a real uvicorn server: tritonclient (binary and JSON), batching, admin, metrics.

Outputs are compared with the model's own forward (what ``gated evaluate`` runs) within 1e-5.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from models import GatedNetwork, load_checkpoint
from tests.integration.conftest import Server
from tests.utils.service import ADMIN_TOKEN, reference_logits

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
METRICS = (
    "gated_requests",
    "gated_request_duration_seconds",
    "gated_queue_duration_seconds",
    "gated_compute_duration_seconds",
    "gated_batch_size",
    "gated_request_active_channel_ratio",
    "gated_request_flops_ratio",
    "gated_layer_active_channel_ratio",
    "gated_queue_depth",
    "gated_inflight_requests",
    "gated_model_ready",
    "gated_gate_mode",
    "gated_gate_keep_ratio",
    "gated_gate_mode_switches",
    "gated_rejected_requests",
    "gated_build_info",
)

REQUESTS = "gated_requests_total"
REST = ("protocol", "rest")


@pytest.fixture(scope="module")
def network(integration_repository: Path) -> GatedNetwork:
    return load_checkpoint(integration_repository / "tiny")


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.address)
    yield c
    c.close()


def _infer(
    client: triton.InferenceServerClient, x: np.ndarray, binary: bool = True, **params: object
) -> tuple[np.ndarray, dict[str, object]]:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer(
        "tiny", [inp], outputs=[out], request_id="req-1", parameters=params or None
    )
    response = result.get_response()
    assert response["id"] == "req-1"
    logits = result.as_numpy("logits")
    assert logits is not None
    return logits, response["parameters"]


def _samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_equals_model_forward(
    client: triton.InferenceServerClient, network: GatedNetwork, binary: bool
) -> None:
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    logits, params = _infer(client, x, binary)
    np.testing.assert_allclose(logits, reference_logits(network, x, "dynamic"), atol=1e-5)
    assert params["gate_mode"] == "dynamic" and params["keep_ratio"] == 0.5
    # What ran: below 1 when the plan gathers, up to dense plus the predictor when it does not.
    assert 0.0 < float(params["flops_ratio"]) < 1.1  # type: ignore[arg-type]


def test_health_metadata_and_repository_index(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "gated-serve" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("tiny")
    assert model["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, -1, 1]}
    assert client.get_model_metadata("tiny", model_version="1")["versions"] == ["1"]
    assert client.get_model_repository_index() == [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""}
    ]
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")


def test_per_request_mode_override(
    client: triton.InferenceServerClient, network: GatedNetwork
) -> None:
    x = np.random.default_rng(1).standard_normal((2, 33)).astype(np.float32)
    dense, p_dense = _infer(client, x, gate_mode="dense")
    sparse, p_sparse = _infer(client, x, gate_mode="dynamic", keep_ratio=0.25)
    static, p_static = _infer(client, x, binary=False, gate_mode="static")
    np.testing.assert_allclose(dense, reference_logits(network, x, "dense"), atol=1e-5)
    np.testing.assert_allclose(
        sparse, reference_logits(network, x, "dynamic", keep_ratio=0.25), atol=1e-5
    )
    np.testing.assert_allclose(static, reference_logits(network, x, "static"), atol=1e-5)
    assert (p_dense["gate_mode"], p_dense["flops_ratio"]) == ("dense", 1.0)
    assert p_sparse["keep_ratio"] == 0.25 and p_static["gate_mode"] == "static"
    assert float(p_sparse["active_channel_ratio"]) < 1.0  # type: ignore[arg-type]
    with pytest.raises(triton.InferenceServerException, match="keep_ratio"):
        _infer(client, x, keep_ratio=1.5)


def test_mixed_lengths_batched_equal_solo(server: Server, network: GatedNetwork) -> None:
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((1 + i % 2, 8 + 7 * i)).astype(np.float32) for i in range(8)]
    before = _samples(server)
    barrier = threading.Barrier(len(inputs))

    def call(x: np.ndarray) -> np.ndarray:
        c = triton.InferenceServerClient(server.address)
        try:
            barrier.wait(5)
            return _infer(c, x)[0]
        finally:
            c.close()

    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(call, inputs))
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, reference_logits(network, x, "dynamic"), atol=1e-5)
    after = _samples(server)
    key = ("gated_batch_size_count", (("model", "tiny"),))
    total = ("gated_batch_size_sum", (("model", "tiny"),))
    batches = after[key] - before[key]
    assert after[total] - before[total] == len(inputs)
    assert batches < len(inputs), "concurrent requests were never batched together"


def test_admin_auth_cases(server: Server, plain_server: Server) -> None:
    url = f"{server.url}/admin/models/tiny/gate"
    assert httpx.get(url).status_code == 401
    wrong = httpx.put(url, json={"mode": "dense"}, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 403
    assert httpx.get(url, headers=AUTH).status_code == 200
    disabled = httpx.get(f"{plain_server.url}/admin/models/tiny/gate", headers=AUTH)
    assert disabled.status_code == 403 and "GATED_ADMIN_TOKEN" in disabled.json()["error"]


def test_naive_server_answers_like_the_batched_one(
    plain_server: Server, network: GatedNetwork
) -> None:
    x = np.random.default_rng(3).standard_normal((2, 17)).astype(np.float32)
    c = triton.InferenceServerClient(plain_server.address)
    try:
        logits, _ = _infer(c, x)
    finally:
        c.close()
    np.testing.assert_allclose(logits, reference_logits(network, x, "dynamic"), atol=1e-5)


def test_switch_under_concurrent_load(server: Server) -> None:
    """Switching to dense mid-load fails nothing, and every later batch runs dense."""
    before = _samples(server)
    done = threading.Semaphore(0)
    x = np.random.default_rng(4).standard_normal((1, 40)).astype(np.float32)
    per_worker = 25

    def worker() -> list[str]:
        modes = []
        c = triton.InferenceServerClient(server.address)
        try:
            for _ in range(per_worker):
                modes.append(str(_infer(c, x)[1]["gate_mode"]))
                done.release()
        finally:
            c.close()
        return modes

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker) for _ in range(4)]
        for _ in range(20):  # let some requests through in the old mode first
            assert done.acquire(timeout=30)
        switched = httpx.put(
            f"{server.url}/admin/models/tiny/gate", json={"mode": "dense"}, headers=AUTH
        )
        assert switched.status_code == 200
        sequences = [f.result(timeout=60) for f in futures]  # raises if any request failed

    for modes in sequences:
        assert len(modes) == per_worker
        first_dense = modes.index("dense") if "dense" in modes else len(modes)
        assert set(modes[first_dense:]) <= {"dense"}, modes  # never back to the old mode
    flat = [m for modes in sequences for m in modes]
    assert "dynamic" in flat and "dense" in flat
    after = _samples(server)
    key = ("gated_gate_mode_switches_total", (("gate_mode", "dense"), ("model", "tiny")))
    assert after[key] - before.get(key, 0.0) == 1
    assert after[("gated_gate_mode", (("gate_mode", "dense"), ("model", "tiny")))] == 1
    restore = httpx.put(
        f"{server.url}/admin/models/tiny/gate", json={"mode": "dynamic"}, headers=AUTH
    )
    assert restore.status_code == 200


def test_metrics_exposed_with_plausible_values(
    server: Server, client: triton.InferenceServerClient
) -> None:
    x = np.random.default_rng(5).standard_normal((2, 40)).astype(np.float32)
    for _ in range(3):
        _infer(client, x)
    httpx.post(f"{server.url}/v2/models/tiny/infer", json={"inputs": []})
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    missing = [m for m in METRICS if m not in families]
    assert not missing, missing
    s = _samples(server)
    tiny = (("model", "tiny"),)
    assert s[(REQUESTS, (("model", "tiny"), ("outcome", "success"), REST))] >= 3
    assert s[(REQUESTS, (("model", "tiny"), ("outcome", "invalid"), REST))] >= 1
    assert s[("gated_rejected_requests_total", (("reason", "invalid_input"),))] >= 1
    count, total = (
        s[("gated_request_duration_seconds_count", tiny)],
        s[("gated_request_duration_seconds_sum", tiny)],
    )
    assert count >= 3 and 0.0 < total / count < 5.0
    assert s[("gated_queue_duration_seconds_count", tiny)] >= 3
    mean_batch = s[("gated_batch_size_sum", tiny)] / s[("gated_batch_size_count", tiny)]
    assert 1.0 <= mean_batch <= 8.0
    dyn = (("gate_mode", "dynamic"), ("model", "tiny"))
    assert s[("gated_compute_duration_seconds_count", dyn)] >= 1
    # The flops ratio counts what ran, a little over 1 if the plan chose the dense fallback.
    for name, top in (
        ("gated_request_active_channel_ratio", 1.0),
        ("gated_request_flops_ratio", 1.1),
    ):
        n, v = s[(f"{name}_count", dyn)], s[(f"{name}_sum", dyn)]
        assert n >= 3 and 0.0 < v / n < top
    layer = (("layer", "blocks.0"), ("model", "tiny"))
    n = s[("gated_layer_active_channel_ratio_count", layer)]
    assert n >= 3 and 0.0 < s[("gated_layer_active_channel_ratio_sum", layer)] / n <= 1.0
    assert s[("gated_queue_depth", tiny)] == 0 and s[("gated_inflight_requests", tiny)] == 0
    assert s[("gated_model_ready", tiny)] == 1
    assert s[("gated_gate_keep_ratio", tiny)] == 0.5
    assert sum(v for (k, _), v in s.items() if k == "gated_build_info") == 1
