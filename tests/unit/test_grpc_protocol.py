"""The gRPC protocol definition and codec, without a server.

The messages must be the published protocol's: every field of ours has the number, type and
label of the definition tritonclient ships. The committed descriptor set must be what
``make proto`` compiles from the ``.proto`` today.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from tritonclient.grpc import service_pb2

from service.dataplane import InferResponse, Limits
from service.errors import (
    ClientDisconnected,
    Forbidden,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    ServerNotReady,
    ServiceError,
    Unauthorized,
    Unimplemented,
    codes,
)
from service.grpc import messages
from service.grpc.codec import decode_infer_request, encode_infer_response
from service.protocol.types import Tensor

LIMITS = Limits(
    max_inputs=4, max_outputs=4, max_tensor_elements=1000, max_request_bytes=1 << 20,
    max_json_values=5000,
)


def _walk(descriptor: Any) -> Any:
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _walk(nested)


def test_every_message_field_matches_the_published_protocol() -> None:
    theirs = descriptor_pool.Default()
    ours = messages.POOL.FindFileByName("grpc_service.proto")
    checked = 0
    for top in ours.message_types_by_name.values():
        for message in _walk(top):
            published = theirs.FindMessageTypeByName(message.full_name)
            for field in message.fields:
                other = published.fields_by_name.get(field.name)
                assert other is not None, f"{message.full_name}.{field.name} is not published"
                assert (field.number, field.type, field.is_repeated) == (
                    other.number, other.type, other.is_repeated
                ), f"{message.full_name}.{field.name}"
                if field.message_type is not None:
                    assert field.message_type.full_name == other.message_type.full_name
                checked += 1
    assert checked > 150
    service = theirs.FindServiceByName(messages.SERVICE)
    assert [(m.name, m.input_type.full_name, m.output_type.full_name) for m in service.methods] == [
        (m.name, m.input_type.full_name, m.output_type.full_name)
        for m in messages.SERVICE_DESCRIPTOR.methods
    ]


def test_descriptor_set_is_compiled_from_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "compiled.binpb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{messages.PROTO.parent}",
         f"--descriptor_set_out={out}", messages.PROTO.name],
        check=True, capture_output=True,
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    committed = descriptor_pb2.FileDescriptorSet.FromString(messages.DESCRIPTOR_SET.read_bytes())
    assert compiled == committed, "service/grpc/grpc_service.binpb is stale: run `make proto`"


def _request(**fields: Any) -> Any:
    """Our message from tritonclient's: the wire bytes are the contract between them."""
    theirs = service_pb2.ModelInferRequest(model_name="m", **fields)
    return messages.ModelInferRequest.FromString(theirs.SerializeToString())


def _tensor(name: str, datatype: str, shape: list[int], **contents: Any) -> Any:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape
    )
    if contents:
        tensor.contents.CopyFrom(service_pb2.InferTensorContents(**contents))
    return tensor


def test_raw_and_typed_contents_decode_to_the_same_tensors() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[1, -2, 3]], dtype=np.int64)
    raw = _request(
        inputs=[_tensor("x", "FP32", [2, 3]), _tensor("ids", "INT64", [1, 3]),
                _tensor("names", "BYTES", [2])],
        raw_input_contents=[x.astype("<f4").tobytes(), ids.astype("<i8").tobytes(),
                            b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"],
    )
    typed = _request(inputs=[
        _tensor("x", "FP32", [2, 3], fp32_contents=x.ravel().tolist()),
        _tensor("ids", "INT64", [1, 3], int64_contents=ids.ravel().tolist()),
        _tensor("names", "BYTES", [2], bytes_contents=[b"a", b"bc"]),
    ])
    for message in (raw, typed):
        decoded = decode_infer_request(message, LIMITS)
        by_name = {t.name: t for t in decoded.inputs}
        np.testing.assert_array_equal(by_name["x"].array, x)
        assert by_name["x"].array.dtype == np.float32
        np.testing.assert_array_equal(by_name["ids"].array, ids)
        assert by_name["ids"].datatype == "INT64"
        assert list(by_name["names"].array) == [b"a", b"bc"]


def test_parameters_and_outputs_decode() -> None:
    message = _request(
        inputs=[_tensor("x", "FP32", [1], fp32_contents=[1.0])],
        id="r-7",
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="logits")],
    )
    message.parameters["keep_ratio"].double_param = 0.25
    message.parameters["gate_mode"].string_param = "dynamic"
    message.parameters["timeout"].int64_param = 5000
    message.parameters["flag"].bool_param = True
    decoded = decode_infer_request(message, LIMITS)
    assert decoded.id == "r-7"
    assert decoded.parameters == {
        "keep_ratio": 0.25, "gate_mode": "dynamic", "timeout": 5000, "flag": True
    }
    assert [o.name for o in decoded.outputs] == ["logits"]


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"inputs": [_tensor("x", "FP32", [2])], "raw_input_contents": [b"1234"]}, "needs 8"),
        ({"inputs": [_tensor("x", "FP32", [1]), _tensor("y", "FP32", [1])],
          "raw_input_contents": [b"1234"]}, "raw_input_contents"),
        ({"inputs": [_tensor("x", "FP32", [2], fp32_contents=[1.0])]}, "needs 2"),
        ({"inputs": [_tensor("x", "FP16", [1])]}, "raw_input_contents"),
        ({"inputs": [_tensor("x", "INT8", [1], int_contents=[300])]}, "range"),
        ({"inputs": [_tensor("x", "FP32", [-1])]}, "negative"),
        ({"inputs": [_tensor("x", "FP32", [1001])]}, "limit"),
        ({"inputs": [_tensor("x", "COMPLEX", [1])]}, "datatype"),
        ({"inputs": [_tensor("x", "FP32", [1], fp32_contents=[1.0])] * 2}, "more than once"),
        ({"inputs": [_tensor(f"x{i}", "FP32", [1]) for i in range(5)]}, "limit is 4"),
    ],
)
def test_defects_name_the_problem(fields: dict[str, Any], word: str) -> None:
    with pytest.raises(InvalidInput, match=word):
        decode_infer_request(_request(**fields), LIMITS)


def test_response_carries_raw_outputs_and_parameters() -> None:
    logits = np.array([[0.5, -1.0]], dtype=np.float32)
    result = InferResponse(
        model_name="m", model_version="1", id="r", outputs=[Tensor("logits", logits)],
        parameters={"gate_mode": "dynamic", "keep_ratio": 0.5, "steps": 3, "exact": False},
        binary_outputs={"logits"},
    )
    theirs = service_pb2.ModelInferResponse.FromString(
        encode_infer_response(result).SerializeToString()
    )
    [out] = theirs.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [1, 2])
    np.testing.assert_array_equal(np.frombuffer(theirs.raw_output_contents[0], "<f4"), [0.5, -1])
    params = theirs.parameters
    assert params["gate_mode"].string_param == "dynamic"
    assert params["keep_ratio"].double_param == 0.5
    assert params["steps"].int64_param == 3 and params["exact"].HasField("bool_param")


@pytest.mark.parametrize(
    ("error", "http", "grpc"),
    [
        (InvalidInput("x"), 400, "INVALID_ARGUMENT"),
        (ModelLoadFailed("x"), 400, "INVALID_ARGUMENT"),
        (ModelNotFound("x"), 404, "NOT_FOUND"),
        (PayloadTooLarge("x"), 413, "RESOURCE_EXHAUSTED"),
        (Unauthorized("x"), 401, "UNAUTHENTICATED"),
        (Forbidden("x"), 403, "PERMISSION_DENIED"),
        (QueueFull("x"), 503, "UNAVAILABLE"),
        (ServerNotReady("x"), 503, "UNAVAILABLE"),
        (RequestTimeout("x"), 504, "DEADLINE_EXCEEDED"),
        (ClientDisconnected("x"), 499, "CANCELLED"),
        (Unimplemented("x"), 501, "UNIMPLEMENTED"),
        (ServiceError("x"), 500, "INTERNAL"),
        (KeyError("x"), 500, "INTERNAL"),
    ],
)
def test_one_table_maps_errors_for_both_protocols(error: Exception, http: int, grpc: str) -> None:
    assert codes(error) == (http, grpc)
