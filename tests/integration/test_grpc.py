"""The gRPC front end on a real server, as ``tritonclient.grpc`` and plain stubs see it.

tritonclient works unchanged (metadata, readiness, model config, inference with raw contents
and gate parameters, the outputs it asks for); typed ``contents`` go through tritonclient's own
generated stub; answers equal the REST front end's for the same request; features the server
lacks answer UNIMPLEMENTED naming them; the standard health service reports SERVING.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from models import load_checkpoint
from tests.integration.conftest import Server
from tests.utils.service import json_request, reference_logits

X = np.random.default_rng(11).standard_normal((3, 30)).astype(np.float32)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.grpc_address)
    yield c
    c.close()


def test_metadata_readiness_and_config(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    meta = client.get_server_metadata()
    assert meta.name == "gated-serve" and "model_repository" in meta.extensions
    model = client.get_model_metadata("tiny")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("input", "FP32", [-1, -1, 1])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("logits", "FP32", [-1, 10])
    ]
    config = client.get_model_config("tiny").config
    assert config.name == "tiny" and config.max_batch_size > 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [-1, 1])]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("nope")
    assert missing.value.status() == "StatusCode.NOT_FOUND" and "nope" in str(missing.value)


def test_infer_with_gate_parameters_equals_rest_and_the_reference(
    server: Server, client: triton.InferenceServerClient, integration_repository: Path
) -> None:
    net = load_checkpoint(integration_repository / "tiny")
    inp = triton.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    result = client.infer(
        "tiny", [inp], outputs=[triton.InferRequestedOutput("logits")], request_id="g-1",
        parameters={"gate_mode": "dynamic", "keep_ratio": 0.25},
    )
    logits = result.as_numpy("logits")
    np.testing.assert_allclose(
        logits, reference_logits(net, X, "dynamic", keep_ratio=0.25), atol=1e-5
    )
    response = result.get_response()
    assert response.id == "g-1" and response.model_version == "1"
    params = response.parameters
    assert params["gate_mode"].string_param == "dynamic"
    assert params["keep_ratio"].double_param == 0.25
    assert 0 < params["flops_ratio"].double_param < 1
    rest = httpx.post(
        f"{server.url}/v2/models/tiny/infer",
        content=orjson.dumps(json_request(X, gate_mode="dynamic", keep_ratio=0.25)), timeout=30,
    ).json()
    np.testing.assert_allclose(
        np.asarray(rest["outputs"][0]["data"], np.float32).reshape(logits.shape), logits,
        atol=1e-6,
    )
    assert rest["parameters"]["flops_ratio"] == pytest.approx(params["flops_ratio"].double_param)


def test_typed_contents_through_a_plain_stub(server: Server) -> None:
    channel = grpc.insecure_channel(server.grpc_address)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = service_pb2.ModelInferRequest(model_name="tiny")
        tensor = typed.inputs.add(name="input", datatype="FP32")
        tensor.shape.extend(X.shape)
        tensor.contents.fp32_contents.extend(X.ravel().tolist())
        typed.parameters["gate_mode"].string_param = "static"
        answer = stub.ModelInfer(typed, timeout=30)
        raw = service_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[X.tobytes()])
        raw.inputs.add(name="input", datatype="FP32").shape.extend(X.shape)
        raw.parameters["gate_mode"].string_param = "static"
        again = stub.ModelInfer(raw, timeout=30)
        [out] = answer.outputs
        assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [3, 10])
        assert answer.raw_output_contents[0] == again.raw_output_contents[0]
        assert answer.parameters["gate_mode"].string_param == "static"
        index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=5)
        assert [(m.name, m.state) for m in index.models] == [("tiny", "READY")]
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("call", "feature"),
    [
        (lambda c: c.get_inference_statistics("tiny"), "statistics"),
        (lambda c: c.get_system_shared_memory_status(), "shared memory"),
        (lambda c: c.get_cuda_shared_memory_status(), "CUDA shared memory"),
        (lambda c: c.get_trace_settings(), "trace settings"),
        (lambda c: c.get_log_settings(), "log settings"),
    ],
)
def test_missing_features_answer_unimplemented_naming_them(
    client: triton.InferenceServerClient, call: object, feature: str
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        call(client)  # type: ignore[operator]
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
    assert feature in str(refused.value)


def test_streaming_inference_is_unimplemented(server: Server) -> None:
    channel = grpc.insecure_channel(server.grpc_address)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ModelStreamInfer(iter([service_pb2.ModelInferRequest()]), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        assert "streaming" in refused.value.details()  # type: ignore[attr-defined]
    finally:
        channel.close()


def test_health_service_reports_serving(server: Server) -> None:
    channel = grpc.insecure_channel(server.grpc_address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    finally:
        channel.close()
