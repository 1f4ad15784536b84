"""The app in-process: V2 endpoints, validation and error mapping, admin API, metrics, lifespan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models import load_checkpoint
from tests.unit.conftest import ClientFactory
from tests.utils.service import (
    ADMIN_TOKEN,
    TINY_MAX_LENGTH,
    binary_request,
    json_request,
    make_repository,
    reference_logits,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RNG = np.random.default_rng(0)

REQUESTS = "gated_requests_total"
REST = ("protocol", "rest")


def _x(rows: int = 2, length: int = 16) -> np.ndarray:
    return RNG.standard_normal((rows, length)).astype(np.float32)


def test_health_metadata_and_index(service_client: ClientFactory) -> None:
    with service_client() as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").status_code == 200
        meta = client.get("/v2").json()
        assert meta["name"] == "gated-serve" and "binary_tensor_data" in meta["extensions"]
        model = client.get("/v2/models/tiny").json()
        assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, -1, 1]}]
        assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert client.get("/v2/models/tiny/versions/1").json() == model
        assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        index = client.post("/v2/repository/index").json()
        assert [m["name"] for m in index] == ["tiny", "tiny2"]
        assert {m["state"] for m in index} == {"READY"}
        assert client.post("/v2/repository/index", json={"ready": True}).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/nope", 404),
        ("GET", "/v2/models/tiny/versions/2", 404),
        ("GET", "/v2/models/nope/ready", 404),
        ("POST", "/v2/models/nope/infer", 404),
        ("POST", "/v2/models/tiny/versions/7/infer", 404),
        ("GET", "/no/such/route", 404),
        ("DELETE", "/v2/models/tiny", 405),
    ],
)
def test_not_found_has_one_error_shape(
    service_client: ClientFactory, method: str, path: str, status: int
) -> None:
    with service_client() as client:
        response = client.request(method, path, json=json_request(_x()))
        assert response.status_code == status
        assert set(response.json()) == {"error"}


def test_json_and_binary_infer_equal_model_forward(
    service_client: ClientFactory, tiny_repository: Path
) -> None:
    net = load_checkpoint(tiny_repository / "tiny")
    x = _x(3, 25)
    expected = reference_logits(net, x, "dynamic")
    with service_client() as client:
        response = client.post("/v2/models/tiny/infer", json={**json_request(x), "id": "r-1"})
        assert response.status_code == 200
        doc = response.json()
        assert doc["id"] == "r-1" and doc["model_name"] == "tiny"
        [out] = doc["outputs"]
        assert out["name"] == "logits" and out["shape"] == [3, 10]
        np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), expected, atol=1e-5)
        params = doc["parameters"]
        assert params["gate_mode"] == "dynamic" and params["keep_ratio"] == 0.5
        assert 0 < params["active_channel_ratio"] < 1 and 0 < params["flops_ratio"] < 1.1

        body, headers = binary_request(x)
        response = client.post("/v2/models/tiny/versions/1/infer", content=body, headers=headers)
        assert response.status_code == 200
        length = int(response.headers["inference-header-content-length"])
        header = orjson.loads(response.content[:length])
        assert header["outputs"][0]["parameters"]["binary_data_size"] == 3 * 10 * 4
        logits = np.frombuffer(response.content[length:], dtype="<f4").reshape(3, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_three_dimensional_input_and_requested_output(service_client: ClientFactory) -> None:
    x = _x(1, 8)[:, :, None]
    body = json_request(x)
    body["outputs"] = [{"name": "logits", "parameters": {"binary_data": False}}]
    with service_client() as client:
        response = client.post("/v2/models/tiny/infer", json=body)
        assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [1, 10]


def test_per_request_gate_override(service_client: ClientFactory, tiny_repository: Path) -> None:
    net = load_checkpoint(tiny_repository / "tiny")
    x = _x(2, 30)
    with service_client() as client:
        cases = {
            "dense": ({"gate_mode": "dense"}, reference_logits(net, x, "dense")),
            "static": ({"gate_mode": "static"}, reference_logits(net, x, "static")),
            "dyn25": (
                {"gate_mode": "dynamic", "keep_ratio": 0.25},
                reference_logits(net, x, "dynamic", keep_ratio=0.25),
            ),
            "thr": ({"threshold": 0.01}, reference_logits(net, x, "dynamic", threshold=0.01)),
        }
        seen = {}
        for name, (params, expected) in cases.items():
            doc = client.post("/v2/models/tiny/infer", json=json_request(x, **params)).json()
            got = np.array(doc["outputs"][0]["data"]).reshape(2, 10)
            np.testing.assert_allclose(got, expected, atol=1e-5)
            seen[name] = doc["parameters"]
        assert seen["dense"]["gate_mode"] == "dense" and seen["dense"]["flops_ratio"] == 1.0
        assert seen["static"]["keep_ratio"] == 1.0
        assert seen["dyn25"]["keep_ratio"] == 0.25
        assert seen["dyn25"]["active_channel_ratio"] < seen["static"]["active_channel_ratio"]
        assert seen["thr"]["threshold"] == 0.01 and "keep_ratio" not in seen["thr"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gate_mode": "sparse"}, "'gate_mode': got 'sparse'; "),
        ({"gate_mode": 3}, "allowed: dense, static, dynamic"),
        ({"keep_ratio": 0}, "'keep_ratio': got 0; "),
        ({"keep_ratio": 1.5}, "allowed: (0, 1]"),
        ({"keep_ratio": "half"}, "'keep_ratio': got 'half'; Input should be a valid number"),
        ({"keep_ratio": True}, "'keep_ratio': got True"),
        ({"threshold": -0.1}, "'threshold': got -0.1; Input should be greater than or equal"),
        ({"dynamic_weight": 2}, "'dynamic_weight': got 2; "),
        ({"timeout": -5}, "'timeout' must be a positive number of microseconds"),
        ({"timeout": "soon"}, "'timeout' must be a positive number"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    service_client: ClientFactory, params: dict[str, object], message: str
) -> None:
    with service_client() as client:
        response = client.post("/v2/models/tiny/infer", json=json_request(_x(), **params))
        assert response.status_code == 400
        assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["inputs"][0].update(name="x"),
         "unknown input 'x'; model 'tiny' takes 'input'"),
        (lambda b: b["inputs"][0].update(datatype="FP64"), "must be FP32"),
        (lambda b: b.update(outputs=[{"name": "probs"}]), "unknown output 'probs'"),
        (lambda b: b.update(inputs=[]), "missing input 'input'"),
        (lambda b: b.update(inputs=b["inputs"] * 2), "input 'input' appears more than once"),
        (lambda b: b["inputs"][0].update(shape=[2, 4, 2], data=[0.0] * 16), "[batch, T, 1]"),
        (lambda b: b["inputs"][0].update(shape=[0, 16], data=[]), "is empty"),
    ],
)
def test_bad_inputs_are_400(service_client: ClientFactory, mutate: object, message: str) -> None:
    body = json_request(_x(2, 8))
    mutate(body)  # type: ignore[operator]
    with service_client() as client:
        response = client.post("/v2/models/tiny/infer", json=body)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]


def test_limits_length_rows_non_finite_and_body_size(service_client: ClientFactory) -> None:
    with service_client(max_request_rows=4, max_request_bytes=4096) as client:
        too_long = client.post(
            "/v2/models/tiny/infer", json=json_request(_x(1, TINY_MAX_LENGTH + 1))
        )
        assert too_long.status_code == 400 and f"at most {TINY_MAX_LENGTH}" in too_long.text
        rows = client.post("/v2/models/tiny/infer", json=json_request(_x(5, 4)))
        assert rows.status_code == 400 and "limit per request is 4" in rows.text
        x = _x(1, 8)
        x[0, 3] = np.nan
        body, headers = binary_request(x)
        nan = client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert nan.status_code == 400 and "NaN or infinite" in nan.text
        big = client.post("/v2/models/tiny/infer", content=b"{" + b" " * 5000 + b"}")
        assert big.status_code == 413 and "4096" in big.json()["error"]

        def chunks():  # no Content-Length: the limit applies while reading
            for _ in range(10):
                yield b" " * 1000

        streamed = client.post("/v2/models/tiny/infer", content=chunks())
        assert streamed.status_code == 413
        malformed = client.post("/v2/models/tiny/infer", content=b"{not json")
        assert malformed.status_code == 400 and "malformed JSON" in malformed.text


def test_overflowing_input_is_a_400_not_null_logits(service_client: ClientFactory) -> None:
    x = np.full((1, 8), 3e38, dtype=np.float32)  # finite, but squares overflow float32
    with service_client() as client:
        response = client.post("/v2/models/tiny/infer", json=json_request(x))
        assert response.status_code == 400
        assert "not finite" in response.json()["error"]
        assert client.get("/v2/health/ready").status_code == 200


def test_non_finite_allowed_when_configured(service_client: ClientFactory) -> None:
    x = _x(1, 8)
    x[0, 0] = np.inf
    body, headers = binary_request(x)
    with service_client(allow_non_finite=True) as client:
        response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert response.status_code == 200


def test_naive_mode_serves_one_forward_per_request(
    service_client: ClientFactory, tiny_repository: Path
) -> None:
    net = load_checkpoint(tiny_repository / "tiny2")
    x = _x(2, 12)
    with service_client(batching=False) as client:
        body, headers = binary_request(x, gate_mode="static")
        response = client.post("/v2/models/tiny2/infer", content=body, headers=headers)
        assert response.status_code == 200
        length = int(response.headers["inference-header-content-length"])
        logits = np.frombuffer(response.content[length:], dtype="<f4").reshape(2, 10)
        np.testing.assert_allclose(logits, reference_logits(net, x, "static"), atol=1e-5)
        metrics = client.get("/metrics").text
        assert 'gated_batch_size_count{model="tiny2"} 0.0' in metrics


def test_admin_auth(service_client: ClientFactory) -> None:
    with service_client() as client:
        url = "/admin/models/tiny/gate"
        missing = client.get(url)
        assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"]
        assert client.get(url, headers={"Authorization": "Basic abc"}).status_code == 401
        wrong = client.put(url, json={"mode": "dense"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json() == {"error": "invalid admin token"}
        assert client.get(url, headers=AUTH).json()["mode"] == "dynamic"
        assert client.get("/admin/models/nope/gate", headers=AUTH).status_code == 404
    with service_client(admin_token=None) as client:
        disabled = client.get("/admin/models/tiny/gate", headers=AUTH)
        assert disabled.status_code == 403 and "GATED_ADMIN_TOKEN" in disabled.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"mode": "sparse"}, "mode"),
        ({"mode": "dynamic", "keep_ratio": 2}, "keep_ratio"),
        ({"mode": "dynamic", "keep_ratio": "0.5"}, "keep_ratio"),  # strict, as inference
        ({"mode": "dynamic", "keep_ratio": True}, "keep_ratio"),
        ({"mode": "dynamic", "dynamic_weight": "1"}, "dynamic_weight"),
        ({"mode": "dense", "extra": 1}, "extra"),
        ({}, "mode"),
        # Admins, like requests, choose among the compiled plans.
        ({"mode": "dynamic", "keep_ratio": 0.3}, "keep_ratio in {0.25, 0.5, 0.75, 1}"),
    ],
)
def test_admin_validation(
    service_client: ClientFactory, body: dict[str, object], message: str
) -> None:
    with service_client() as client:
        response = client.put("/admin/models/tiny/gate", json=body, headers=AUTH)
        assert response.status_code == 400 and message in response.json()["error"]


def test_admin_switch_changes_later_requests_and_counts(service_client: ClientFactory) -> None:
    x = _x(1, 10)
    with service_client() as client:
        before = client.post("/v2/models/tiny/infer", json=json_request(x)).json()["parameters"]
        switched = client.put(
            "/admin/models/tiny/gate", json={"mode": "static", "keep_ratio": 0.5}, headers=AUTH
        )
        assert switched.status_code == 200
        assert switched.json()["previous"]["mode"] == "dynamic"
        after = client.post("/v2/models/tiny/infer", json=json_request(x)).json()["parameters"]
        assert (before["gate_mode"], after["gate_mode"]) == ("dynamic", "static")
        other = client.post("/v2/models/tiny2/infer", json=json_request(x)).json()["parameters"]
        assert other["gate_mode"] == "dynamic"  # per model
        text = client.get("/metrics").text
        assert 'gated_gate_mode_switches_total{gate_mode="static",model="tiny"} 1.0' in text
        assert 'gated_gate_mode{gate_mode="static",model="tiny"} 1.0' in text


def test_default_gate_from_settings(service_client: ClientFactory) -> None:
    with service_client(default_gate_mode="dense") as client:
        doc = client.post("/v2/models/tiny/infer", json=json_request(_x())).json()
        assert doc["parameters"]["gate_mode"] == "dense"


def test_metrics_after_traffic(service_client: ClientFactory) -> None:
    with service_client() as client:
        for _ in range(3):
            client.post("/v2/models/tiny/infer", json=json_request(_x()))
        client.post("/v2/models/tiny/infer", json=json_request(_x(), keep_ratio=9))
        client.post("/v2/models/nope/infer", json=json_request(_x()))
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values() for s in f.samples
    }
    assert samples[(REQUESTS, (("model", "tiny"), ("outcome", "success"), REST))] == 3
    assert samples[(REQUESTS, (("model", "tiny"), ("outcome", "invalid"), REST))] == 1
    assert samples[("gated_rejected_requests_total", (("reason", "invalid_input"),))] == 1
    assert samples[("gated_rejected_requests_total", (("reason", "unknown_model"),))] == 1
    assert samples[("gated_batch_size_count", (("model", "tiny"),))] == 3
    assert samples[("gated_model_ready", (("model", "tiny"),))] == 1
    assert samples[("gated_queue_depth", (("model", "tiny"),))] == 0
    assert samples[("gated_inflight_requests", (("model", "tiny"),))] == 0
    assert samples[(
        "gated_request_flops_ratio_count", (("gate_mode", "dynamic"), ("model", "tiny"))
    )] == 3
    assert samples[("gated_layer_active_channel_ratio_count",
                    (("layer", "blocks.1"), ("model", "tiny")))] == 3
    assert "gated_build_info" in families and "gated_compute_duration_seconds" in families


def test_lifespan_shutdown_marks_not_ready(service_client: ClientFactory) -> None:
    with service_client() as client:
        app = client.app
    state = app.state.service  # type: ignore[attr-defined]
    assert state.draining and not state.ready


def test_small_bodies_are_bounded_too(service_client: ClientFactory) -> None:
    with service_client(max_request_bytes=1024) as client:
        big = b'{"mode": "dense"' + b" " * 2000 + b"}"
        admin = client.put("/admin/models/tiny/gate", content=big, headers=AUTH)
        assert admin.status_code == 413
        index = client.post("/v2/repository/index", content=b" " * 2000)
        assert index.status_code == 413
        bad = client.post("/v2/repository/index", content=b'{"ready": "maybe"}')
        assert bad.status_code == 400 and "ready" in bad.json()["error"]


def test_a_models_serving_file_bounds_its_own_batches_and_requests(
    tmp_path: Path, service_client: ClientFactory
) -> None:
    from service.engine import Engine, EngineError
    from service.settings import ModelServing, ServingBounds, load_settings

    repo = make_repository(tmp_path / "repo", ("tiny", "small"))
    (repo / "small" / "serving.yaml").write_text(
        "max_batch_rows: 2\nmax_batch_size: 2\nkeep_ratios: [0.5]\n")
    settings = load_settings(model_repository=repo, max_request_rows=8, max_batch_rows=16)
    assert ModelServing(max_batch_rows=2).resolved(settings) == ServingBounds(
        max_batch_size=settings.max_batch_size, max_batch_rows=2, max_request_rows=2,
        keep_ratios=settings.keep_ratios)
    with service_client(model_repository=repo) as client:
        big = client.post("/v2/models/small/infer", json=json_request(_x(3, 8)))
        assert big.status_code == 400 and "limit per request is 2" in big.json()["error"]
        assert client.post("/v2/models/small/infer", json=json_request(_x(2, 8))).status_code == 200
        assert client.post("/v2/models/tiny/infer", json=json_request(_x(3, 8))).status_code == 200
        # Its own keep ratios (and the checkpoint's): 0.25 is the server's, not this model's.
        narrowed = client.post("/v2/models/small/infer",
                               json=json_request(_x(1, 8), keep_ratio=0.25))
        assert narrowed.status_code == 400
        assert "keep_ratios of small/serving.yaml" in narrowed.json()["error"]
        assert client.post("/v2/models/tiny/infer", json=json_request(
            _x(1, 8), keep_ratio=0.25)).status_code == 200
        assert client.post("/v2/models/small/infer", json=json_request(
            _x(1, 8), keep_ratio=0.5)).status_code == 200
    (repo / "small" / "serving.yaml").write_text("max_batch_rows: 0\nbatch: 3\n")
    with pytest.raises(EngineError, match=r"model 'small': .*serving.yaml: max_batch_rows: "
                       r"Input should be greater than or equal to 1; batch: Extra inputs"):
        Engine.load(repo, "cpu")
    (repo / "small" / "serving.yaml").write_text("max_batch_rows: [1\n")
    with pytest.raises(EngineError, match="serving.yaml: unreadable YAML"):
        Engine.load(repo, "cpu")
