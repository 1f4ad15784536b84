"""Hostile input against a real server: every case is a 4xx (over gRPC, the matching status)
naming the problem, never a crash.

After the whole battery the server must still be ready and answer a valid request.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2

from tests.integration.conftest import Server, serving
from tests.utils.clients import SERVICE, GrpcClient, Reply, grpc_error, grpc_request
from tests.utils.service import binary_request, json_request, metric

MAX_BYTES = 1024 * 1024
MAX_ROWS = 4
HEADER = "Inference-Header-Content-Length"
X = np.zeros((1, 8), dtype=np.float32)


def _valid() -> dict[str, object]:
    return json_request(X)


def _with_input(**fields: object) -> bytes:
    body = _valid()
    body["inputs"][0].update(fields)  # type: ignore[index]
    return orjson.dumps(body)


def _binary_shape(shape: list[int]) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request whose header declares ``shape`` and 0 bytes of data."""
    head = orjson.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": 0}}]})
    return head, {HEADER: str(len(head))}


def _with_output(parameters: dict[str, object]) -> bytes:
    return orjson.dumps({**_valid(), "outputs": [{"name": "logits", "parameters": parameters}]})


def _binary(
    size: int | None = None, cut: int = 0, header_extra: int = 0
) -> tuple[bytes, dict[str, str]]:
    body, headers = binary_request(X)
    header_len = int(headers[HEADER])
    if size is not None:
        head = orjson.loads(body[:header_len])
        head["inputs"][0]["parameters"]["binary_data_size"] = size
        raw = orjson.dumps(head)
        body, header_len = raw + body[header_len:], len(raw)
    if cut:
        body = body[:-cut]
    return body, {HEADER: str(header_len + header_extra)}


def _nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


# (case id, path suffix, body, extra headers, expected status, word the message must contain)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("malformed_json", "models/tiny/infer", b'{"inputs": [', {}, 400, "json"),
    ("not_an_object", "models/tiny/infer", b"[1, 2, 3]", {}, 400, "object"),
    ("wrong_datatype", "models/tiny/infer", _with_input(datatype="INT64", data=[0] * 8), {}, 400,
     "FP32"),
    ("unknown_datatype", "models/tiny/infer", _with_input(datatype="FP99"), {}, 400, "datatype"),
    ("shape_data_mismatch", "models/tiny/infer", _with_input(shape=[1, 9]), {}, 400, "shape"),
    ("negative_shape", "models/tiny/infer", _with_input(shape=[-1, 8]), {}, 400, "shape"),
    ("string_in_data", "models/tiny/infer", _with_input(data=["a"] * 8), {}, 400, "numbers"),
    ("wrong_input_name", "models/tiny/infer", _with_input(name="nope"), {}, 400, "input"),
    ("binary_size_too_big", "models/tiny/infer", *_binary(size=10_000), 400, "binary_data_size"),
    ("binary_size_too_small", "models/tiny/infer", *_binary(size=4), 400, "binary_data_size"),
    ("truncated_binary_body", "models/tiny/infer", *_binary(cut=5), 400, "truncated"),
    ("header_past_body", "models/tiny/infer", *_binary(header_extra=10_000), 400, "header"),
    ("header_not_a_number", "models/tiny/infer", _binary()[0], {HEADER: "abc"}, 400, "header"),
    ("nan_json_null", "models/tiny/infer", _with_input(data=[None] * 8), {}, 400, "numbers"),
    ("nan_binary", "models/tiny/infer", *binary_request(np.full((1, 8), np.nan, np.float32)),
     400, "NaN"),
    ("inf_json_literal", "models/tiny/infer",
     b'{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","data":[Infinity,1]}]}',
     {}, 400, "infinite"),
    ("inf_binary", "models/tiny/infer", *binary_request(np.full((1, 8), np.inf, np.float32)),
     400, "infinite"),
    ("too_many_rows", "models/tiny/infer",
     orjson.dumps(json_request(np.zeros((MAX_ROWS + 1, 8), np.float32))), {}, 400, str(MAX_ROWS)),
    ("too_long", "models/tiny/infer",
     orjson.dumps(json_request(np.zeros((1, 65), np.float32))), {}, 400, "64"),
    ("unknown_model", "models/nope/infer", orjson.dumps(_valid()), {}, 404, "nope"),
    ("unknown_version", "models/tiny/versions/7/infer", orjson.dumps(_valid()), {}, 404, "7"),
    ("unknown_gate_mode", "models/tiny/infer",
     orjson.dumps(json_request(X, gate_mode="sparse")), {}, 400, "gate_mode"),
    ("keep_ratio_zero", "models/tiny/infer",
     orjson.dumps(json_request(X, keep_ratio=0.0)), {}, 400, "keep_ratio"),
    ("keep_ratio_above_one", "models/tiny/infer",
     orjson.dumps(json_request(X, keep_ratio=1.5)), {}, 400, "keep_ratio"),
    ("keep_ratio_string", "models/tiny/infer",
     orjson.dumps(json_request(X, keep_ratio="half")), {}, 400, "keep_ratio"),
    ("gate_mode_number", "models/tiny/infer",
     orjson.dumps(json_request(X, gate_mode=3)), {}, 400, "gate_mode"),
    ("parameters_not_object", "models/tiny/infer",
     orjson.dumps({**_valid(), "parameters": [1, 2]}), {}, 400, "parameters"),
    ("timeout_string", "models/tiny/infer",
     orjson.dumps(json_request(X, timeout="soon")), {}, 400, "timeout"),
    # Under the model's byte limit (its largest request's elements × 32 B + 64 KiB = 72 KiB)...
    ("deep_nested_json", "models/tiny/infer", _nested(3_000), {}, 400, "depth"),
    # ...with far more JSON values than the model's tensors hold: refused before parsing.
    ("json_of_tiny_values", "models/tiny/infer",
     orjson.dumps({**_valid(), "parameters": {"x": [0] * 20_000}}), {}, 413, "values"),
    ("body_over_model_limit", "models/tiny/infer", b" " * 300_000, {}, 413, "limit"),
    ("body_over_limit", "models/tiny/infer", b" " * (MAX_BYTES + 1), {}, 413, "limit"),
    ("ten_mb_string_id", "models/tiny/infer",
     orjson.dumps({**_valid(), "id": "x" * 10_000_000}), {}, 413, "limit"),
    ("id_not_string", "models/tiny/infer", orjson.dumps({**_valid(), "id": {"a": 1}}), {}, 400,
     "id"),
    ("empty_but_huge_shape", "models/tiny/infer", _with_input(shape=[0, 2**62], data=[]), {},
     400, "limit"),
    ("empty_shape_of_int64_max", "models/tiny/infer",
     _with_input(shape=[0, 2**63 - 1], data=[]), {}, 400, "limit"),
    ("empty_binary_shape_of_int64_max", "models/tiny/infer", *_binary_shape([0, 2**63 - 1]),
     400, "limit"),
    ("shape_beyond_int64", "models/tiny/infer",
     b'{"inputs":[{"name":"input","shape":[1,1180591620717411303424],"datatype":"FP32",'
     b'"data":[]}]}', {}, 400, "integers"),
    ("too_many_outputs", "models/tiny/infer",
     orjson.dumps({**_valid(), "outputs": [{"name": f"o{i}"} for i in range(1_000)]}), {}, 400,
     "limit"),
    ("long_model_name", f"models/{'m' * 10_000}/infer", orjson.dumps(_valid()), {}, 404,
     "10000 characters"),
    ("output_shared_memory", "models/tiny/infer",
     _with_output({"shared_memory_region": "r", "shared_memory_byte_size": 40}), {}, 400,
     "shared memory"),
    ("output_classification", "models/tiny/infer", _with_output({"classification": 3}), {}, 400,
     "classification"),
]


@pytest.fixture(scope="module")
def hostile_server(
    integration_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(
        integration_repository, tmp_path_factory.mktemp("logs"),
        max_request_bytes=MAX_BYTES, max_request_rows=MAX_ROWS,
    ) as srv:
        yield srv


def test_hostile_inputs_get_4xx_and_server_keeps_serving(hostile_server: Server) -> None:
    failures = []
    with httpx.Client(base_url=f"{hostile_server.url}/v2/", timeout=20.0) as client:
        for case, path, body, headers, status, word in CASES:
            response = client.post(path, content=body, headers=headers)
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = None
            ok = (
                response.status_code == status and isinstance(message, str) and message
                and word.lower() in message.lower()
            )
            if not ok:
                failures.append(f"{case}: {response.status_code} {response.text[:200]!r}")
        assert client.get("health/ready").status_code == 200
        valid = client.post("models/tiny/infer", content=orjson.dumps(_valid()))
        assert valid.status_code == 200, valid.text
    assert not failures, "\n".join(failures)
    assert hostile_server.process.poll() is None
    assert "Traceback" not in hostile_server.output()


# ---------------------------------------------------------------------- the same over gRPC


def _grpc(x: np.ndarray = X, model: str = "tiny", **parameters: object) -> Any:
    return grpc_request(x, model, parameters)


def _grpc_edit(edit: Callable[[Any], None], x: np.ndarray = X) -> Any:
    request = _grpc(x)
    edit(request)
    return request


def _typed(values: list[float], shape: list[int]) -> Any:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input", datatype="FP32")
    tensor.shape.extend(shape)
    tensor.contents.fp32_contents.extend(values)
    return request


def _set(path: str, value: object) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        target = request.inputs[0]
        if path == "shape":
            del target.shape[:]
            target.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(target, path, value)

    return edit


# (case id, request message or raw bytes, expected outcome, word the message must contain)
GRPC_CASES: list[tuple[str, Any, str, str]] = [
    ("not_protobuf", b"\xff\xff\xff\xff garbage", "invalid", "protobuf"),
    ("wrong_datatype", _grpc_edit(_set("datatype", "INT64")), "invalid", "bytes"),
    ("unknown_datatype", _grpc_edit(_set("datatype", "FP99")), "invalid", "datatype"),
    ("shape_bytes_mismatch", _grpc_edit(_set("shape", [1, 9])), "invalid", "bytes"),
    ("negative_shape", _grpc_edit(_set("shape", [-1, 8])), "invalid", "negative"),
    ("huge_shape", _grpc_edit(_set("shape", [1 << 20, 1 << 20])), "invalid", "limit"),
    ("wrong_input_name", _grpc_edit(_set("name", "nope")), "invalid", "input"),
    ("no_input_name", _grpc_edit(_set("name", "")), "invalid", "name"),
    ("raw_count_mismatch", _grpc_edit(lambda r: r.raw_input_contents.append(b"1234")),
     "invalid", "raw_input_contents"),
    ("raw_and_typed", _grpc_edit(lambda r: r.inputs[0].contents.fp32_contents.extend([0.0] * 8)),
     "invalid", "contents"),
    ("typed_count_mismatch", _typed([0.0] * 7, [1, 8]), "invalid", "contents"),
    ("fp16_typed", _grpc_edit(lambda r: (_set("datatype", "FP16")(r),
                                         r.ClearField("raw_input_contents"))),
     "invalid", "raw_input_contents"),
    ("nan_raw", _grpc(np.full((1, 8), np.nan, np.float32)), "invalid", "NaN"),
    ("inf_typed", _typed([float("inf")] * 8, [1, 8]), "invalid", "infinite"),
    ("too_many_rows", _grpc(np.zeros((MAX_ROWS + 1, 8), np.float32)), "invalid", str(MAX_ROWS)),
    ("too_long", _grpc(np.zeros((1, 65), np.float32)), "invalid", "64"),
    ("unknown_model", _grpc(model="nope"), "not_found", "nope"),
    ("unknown_version", _grpc_edit(lambda r: setattr(r, "model_version", "7")), "not_found", "7"),
    ("unknown_gate_mode", _grpc(gate_mode="sparse"), "invalid", "gate_mode"),
    ("keep_ratio_zero", _grpc(keep_ratio=0.0), "invalid", "keep_ratio"),
    ("keep_ratio_above_one", _grpc(keep_ratio=1.5), "invalid", "keep_ratio"),
    ("keep_ratio_string", _grpc(keep_ratio="half"), "invalid", "keep_ratio"),
    ("gate_mode_number", _grpc(gate_mode=3), "invalid", "gate_mode"),
    ("timeout_string", _grpc(timeout="soon"), "invalid", "timeout"),
    ("empty_parameter", _grpc_edit(lambda r: r.parameters["keep_ratio"].Clear()),
     "invalid", "keep_ratio"),
    ("unknown_output", _grpc_edit(lambda r: r.outputs.add(name="probs")), "invalid", "probs"),
    ("message_over_limit", _grpc(np.zeros((1, MAX_BYTES // 4 + 8), np.float32)), "too_large", ""),
    ("empty_but_huge_shape", _grpc_edit(_set("shape", [0, 1 << 62])), "invalid", "limit"),
    ("too_many_outputs",
     _grpc_edit(lambda r: [r.outputs.add(name=f"o{i}") for i in range(10_000)]), "invalid",
     "limit"),
    ("too_many_parameters",
     _grpc_edit(lambda r: [r.parameters[f"p{i}"].CopyFrom(r.parameters["x"]) for i in range(100)]),
     "invalid", "limit"),
    ("long_model_name", _grpc(model="m" * 100_000), "not_found", "100000 characters"),
    ("output_shared_memory",
     _grpc_edit(lambda r: r.outputs.add(name="logits").parameters["shared_memory_region"]
                .CopyFrom(service_pb2.InferParameter(string_param="r"))),
     "invalid", "shared memory"),
    ("output_classification",
     _grpc_edit(lambda r: r.outputs.add(name="logits").parameters["classification"]
                .CopyFrom(service_pb2.InferParameter(int64_param=3))),
     "invalid", "classification"),
]


def test_hostile_grpc_requests_get_the_matching_codes(hostile_server: Server) -> None:
    """The REST battery's defects over gRPC: INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED
    naming the problem, never INTERNAL or UNKNOWN; the server keeps serving."""
    channel = grpc.insecure_channel(hostile_server.grpc_address)
    raw_call = channel.unary_unary(
        SERVICE + "ModelInfer", response_deserializer=service_pb2.ModelInferResponse.FromString
    )
    failures = []
    try:
        for case, request, outcome, word in GRPC_CASES:
            payload = request if isinstance(request, bytes) else request.SerializeToString()
            try:
                raw_call(payload, timeout=20)
                got = Reply("ok")
            except grpc.RpcError as err:
                got = grpc_error(err)
            if got.outcome != outcome or word.lower() not in got.message.lower():
                failures.append(f"{case}: {got.outcome} {got.message[:200]!r}")
        caller = GrpcClient(hostile_server.grpc_address)
        assert caller.ready()
        assert caller.infer(X).outcome == "ok"
        caller.close()
    finally:
        channel.close()
    assert not failures, "\n".join(failures)
    assert hostile_server.process.poll() is None
    assert "Traceback" not in hostile_server.output()


def test_a_client_leaving_mid_upload_is_counted_as_cancelled(hostile_server: Server) -> None:
    """Not a server error: no traceback, outcome ``cancelled``."""
    errors = metric(hostile_server.url, "gated_requests_total", outcome="error")
    left = metric(hostile_server.url, "gated_rejected_requests_total",
                  reason="client_disconnected")
    body = orjson.dumps(_valid())
    with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: test\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10]
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while metric(hostile_server.url, "gated_rejected_requests_total",
                 reason="client_disconnected") == left:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.05)
    assert metric(hostile_server.url, "gated_requests_total", outcome="error") == errors
    assert "Traceback" not in hostile_server.output()
