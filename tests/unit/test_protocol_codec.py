"""V2 codec: tritonclient interoperability, every datatype, and every malformed-body error."""

import contextlib
import struct
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from service.protocol.codec import (
    MAX_DEPTH,
    decode_request,
    encode_response,
    parse_header_length,
)
from service.protocol.errors import InvalidInput
from service.protocol.types import (
    WIRE_DTYPES,
    ErrorResponse,
    InferenceRequest,
    ModelMetadata,
    RepositoryIndex,
    Tensor,
)

DATATYPES = list(WIRE_DTYPES)


def _sample(datatype: str, *, utf8: bool = True) -> np.ndarray:
    """A (2, 3) array that exercises each datatype's extremes."""
    if datatype == "BYTES":
        items = [b"", b"a", "h\u00e9llo".encode(), b"x" * 300, b"\x00\x01", b"last"]
        if not utf8:
            items[4] = b"\x00\xff\xfe"
        return np.array(items, dtype=object).reshape(2, 3)
    dtype = WIRE_DTYPES[datatype].newbyteorder("=")
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([info.min, info.max, 0, 1, info.max - 1, 7], dtype=dtype).reshape(2, 3)
    info_f = np.finfo(dtype)
    values = [float(info_f.min), float(info_f.max), 0.0, -1.5, float(info_f.tiny), 2.25]
    return np.array(values, dtype=dtype).reshape(2, 3)


def _triton_body(
    arrays: dict[str, np.ndarray],
    *,
    binary: bool,
    outputs: list[Any] | None = None,
    **kwargs: Any,
) -> tuple[bytes, int | None]:
    """The exact body and header length `InferenceServerClient.infer` would send."""
    inputs = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == object else triton.np_to_triton_dtype(array.dtype)
        inp = triton.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        inputs.append(inp)
    body, header_length = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, **kwargs
    )
    return body, header_length


def _json(doc: Any) -> bytes:
    return orjson.dumps(doc)


def _fp32(name: str = "x", **fields: Any) -> dict[str, Any]:
    return {"name": name, "shape": [2, 3], "datatype": "FP32", **fields}


def _binary(inputs: list[dict[str, Any]], *chunks: bytes) -> tuple[bytes, int]:
    header = _json({"inputs": inputs})
    return header + b"".join(chunks), len(header)


# --------------------------------------------------------------------------- tritonclient requests


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_tritonclient_request_decodes_every_datatype(datatype: str, binary: bool) -> None:
    original = _sample(datatype)
    body, header_length = _triton_body({"x": original}, binary=binary)
    assert (header_length is not None) == binary

    request = decode_request(body, header_length)

    (tensor,) = request.inputs
    assert tensor.name == "x"
    assert tensor.datatype == datatype
    assert tensor.array.shape == (2, 3)
    assert tensor.array.flags.writeable and tensor.array.dtype.isnative
    if datatype == "BYTES":
        assert tensor.array.tolist() == original.tolist()
    else:
        assert tensor.array.dtype == original.dtype
        np.testing.assert_array_equal(tensor.array, original)


def test_tritonclient_binary_bytes_need_not_be_utf8() -> None:
    original = _sample("BYTES", utf8=False)
    request = decode_request(*_triton_body({"s": original}, binary=True))
    assert request.inputs[0].array.tolist() == original.tolist()


def test_tritonclient_mixed_inputs_keep_order_and_metadata() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([[1, -2]], dtype=np.int64)
    c = np.array([b"q", b"rs"], dtype=object)
    inputs = []
    for name, array, datatype, binary in [
        ("a", a, "FP32", True),
        ("b", b, "INT64", False),
        ("c", c, "BYTES", True),
    ]:
        inp = triton.InferInput(name, list(array.shape), datatype)
        inputs.append(inp.set_data_from_numpy(array, binary_data=binary))
    outputs = [
        triton.InferRequestedOutput("y", binary_data=True),
        triton.InferRequestedOutput("z", binary_data=False),
    ]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="req-7", parameters={"temperature": 0.5}
    )

    request = decode_request(body, header_length)

    assert request.id == "req-7"
    assert request.parameters == {"temperature": 0.5}
    assert [t.name for t in request.inputs] == ["a", "b", "c"]
    np.testing.assert_array_equal(request.inputs[0].array, a)
    np.testing.assert_array_equal(request.inputs[1].array, b)
    assert request.inputs[2].array.tolist() == [b"q", b"rs"]
    assert [(o.name, o.binary) for o in request.outputs] == [("y", True), ("z", False)]
    assert request.binary_output is False
    assert request.binary_output_names(["y", "z", "extra"]) == {"y"}


def test_tritonclient_without_outputs_asks_for_binary_everything() -> None:
    body, header_length = _triton_body({"x": np.ones((1, 2), np.float32)}, binary=True)
    request = decode_request(body, header_length)
    assert request.outputs == []
    assert request.binary_output is True
    assert "binary_data_output" not in request.parameters
    assert request.binary_output_names(["a", "b"]) == {"a", "b"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_non_finite_floats_decode(binary: bool) -> None:
    # tritonclient's JSON mode writes NaN/Infinity literals, which strict JSON refuses.
    original = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    body, header_length = _triton_body({"x": original}, binary=binary)
    np.testing.assert_array_equal(decode_request(body, header_length).inputs[0].array, original)


def test_nested_json_data_is_row_major() -> None:
    body = _json({"inputs": [_fp32(data=[[1, 2, 3], [4, 5, 6]])]})
    array = decode_request(body).inputs[0].array
    np.testing.assert_array_equal(array, np.arange(1, 7, dtype=np.float32).reshape(2, 3))


def test_empty_and_scalar_tensors() -> None:
    body, header_length = _binary(
        [
            {
                "name": "e",
                "shape": [0, 4],
                "datatype": "INT32",
                "parameters": {"binary_data_size": 0},
            },
            {"name": "s", "shape": [], "datatype": "FP64", "data": [2.5]},
            {"name": "b", "shape": [0], "datatype": "BYTES", "data": []},
        ]
    )
    e, s, b = decode_request(body, header_length).inputs
    assert e.array.shape == (0, 4) and e.array.dtype == np.int32
    assert s.array.shape == () and s.array.item() == 2.5
    assert b.array.shape == (0,) and b.datatype == "BYTES"


def test_data_nested_exactly_max_depth_is_accepted() -> None:
    data: Any = [1.0]
    for _ in range(MAX_DEPTH - 1):
        data = [data]
    body = _json(
        {"inputs": [{"name": "x", "shape": [1] * MAX_DEPTH, "datatype": "FP32", "data": data}]}
    )
    assert decode_request(body).inputs[0].array.ndim == MAX_DEPTH


# --------------------------------------------------------------------------- tritonclient responses


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_response_parses_in_tritonclient(datatype: str, binary: bool) -> None:
    original = _sample(datatype)
    body, header_length = encode_response(
        model_name="gated",
        model_version="1",
        request_id="r1",
        outputs=[Tensor("y", original)],
        binary=binary,
    )
    assert (header_length is not None) == binary

    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)

    assert result.get_response()["model_name"] == "gated"
    assert result.get_response()["id"] == "r1"
    got = result.as_numpy("y")
    if datatype == "BYTES" and not binary:
        assert got.tolist() == [[v.decode() for v in row] for row in original.tolist()]
    elif datatype == "BYTES":
        assert got.tolist() == original.tolist()
    else:
        assert got.dtype == original.dtype
        np.testing.assert_array_equal(got, original)


def test_response_binary_selection_by_name() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    z = np.array([[1, 2]], dtype=np.int8)
    raw = np.array([b"\xff"], dtype=object)
    body, header_length = encode_response(
        model_name="m",
        outputs=[Tensor("y", y, {"gate_density": 0.25}), Tensor("z", z), Tensor("raw", raw)],
        binary={"y", "raw"},
        parameters={"batch_size": 3},
    )
    assert header_length is not None

    header = orjson.loads(body[:header_length])
    assert header["parameters"] == {"batch_size": 3}
    assert header["outputs"][0]["parameters"] == {"gate_density": 0.25, "binary_data_size": 24}
    assert header["outputs"][1]["data"] == [1, 2] and "parameters" not in header["outputs"][1]
    assert len(body) == header_length + 24 + 4 + 1

    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("z"), z)
    assert result.as_numpy("raw").tolist() == [b"\xff"]


def test_response_non_contiguous_and_big_endian_arrays() -> None:
    base = np.arange(12, dtype=">i4").reshape(3, 4)
    view = base.T
    for binary in (True, False):
        body, header_length = encode_response(
            model_name="m", outputs=[Tensor("y", view)], binary=binary
        )
        result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
        np.testing.assert_array_equal(result.as_numpy("y"), view)


def test_response_json_non_finite_becomes_null_binary_preserves() -> None:
    y = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    body, header_length = encode_response(model_name="m", outputs=[Tensor("y", y)])
    assert header_length is None
    assert orjson.loads(body)["outputs"][0]["data"] == [None, None, 1.0]

    body, header_length = encode_response(model_name="m", outputs=[Tensor("y", y)], binary=True)
    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("y"), y)


def test_response_json_only_has_no_header_length_and_omits_absent_fields() -> None:
    body, header_length = encode_response(model_name="m", outputs=[])
    assert header_length is None
    assert orjson.loads(body) == {"model_name": "m", "outputs": []}


def test_response_non_utf8_bytes_as_json_is_invalid_input() -> None:
    y = np.array([b"\xff\xfe"], dtype=object)
    with pytest.raises(InvalidInput, match="not UTF-8.*binary_data = true"):
        encode_response(model_name="m", outputs=[Tensor("y", y)])


def test_response_unsupported_dtype_is_a_server_error() -> None:
    with pytest.raises(TypeError, match="complex64 has no V2 datatype"):
        encode_response(model_name="m", outputs=[Tensor("y", np.zeros(2, np.complex64))])


# --------------------------------------------------------------------------- malformed bodies


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


_BYTES_IN = {"name": "s", "shape": [2], "datatype": "BYTES"}
_FP32_24 = _fp32(parameters={"binary_data_size": 24})
_FP32_DATA = list(range(6))

MALFORMED: list[tuple[str, bytes, int | None, str]] = [
    ("truncated json", b'{"inputs": [', None, "malformed JSON"),
    ("empty body", b"", None, "malformed JSON"),
    ("not utf-8", b'{"id": "\xff"}', None, "malformed JSON"),
    ("nan plus lone surrogate", b'{"id": "\\ud800", "x": NaN}', None, "malformed JSON"),
    ("10k nested arrays", b"[" * 10_000 + b"]" * 10_000, None, "malformed JSON"),
    (
        "nan plus deep nesting",
        b'{"x": NaN, "y": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
        None,
        "malformed JSON",
    ),
    ("array body", b"[1, 2]", None, "must be a JSON object, got array"),
    ("string body", b'"hi"', None, "must be a JSON object, got string"),
    ("missing inputs", b"{}", None, "missing required field 'inputs'"),
    ("inputs not array", _json({"inputs": {}}), None, "'inputs' must be an array, got object"),
    ("input not object", _json({"inputs": [3]}), None, "inputs[0] must be an object, got number"),
    ("missing name", _json({"inputs": [{"shape": [1]}]}), None, "inputs[0] is missing required"),
    (
        "missing shape",
        _json({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}),
        None,
        "input 'x' is missing required field 'shape'",
    ),
    (
        "missing datatype",
        _json({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}),
        None,
        "input 'x' is missing required field 'datatype'",
    ),
    (
        "unknown datatype",
        _json({"inputs": [{"name": "x", "shape": [1], "datatype": "BF16", "data": [1]}]}),
        None,
        "input 'x' has unknown datatype 'BF16'; supported: BOOL, UINT8",
    ),
    (
        "negative dim",
        _json({"inputs": [{**_fp32(data=[1]), "shape": [2, -1]}]}),
        None,
        "'shape' [2, -1] has a negative dimension",
    ),
    (
        "string dim",
        _json({"inputs": [{**_fp32(data=[1]), "shape": ["2"]}]}),
        None,
        "'shape' must contain only integers",
    ),
    (
        "bool dim",
        _json({"inputs": [{**_fp32(data=[1]), "shape": [True]}]}),
        None,
        "'shape' must contain only integers",
    ),
    (
        "too many dims",
        _json({"inputs": [{**_fp32(data=[1]), "shape": [1] * 65}]}),
        None,
        "has 65 dimensions; at most 64",
    ),
    (
        "count mismatch",
        _json({"inputs": [_fp32(data=[1, 2, 3, 4, 5])]}),
        None,
        "input 'x' 'data' has 5 elements but shape [2, 3] needs 6",
    ),
    (
        "nested count mismatch",
        _json({"inputs": [_fp32(data=[[1, 2], [3, 4]])]}),
        None,
        "'data' has 4 elements but shape [2, 3] needs 6",
    ),
    (
        "strings in FP32",
        _json({"inputs": [_fp32(data=["1", "2", "3", "4", "5", "6"])]}),
        None,
        "FP32 'data' must hold numbers, found strings",
    ),
    (
        "one string in FP32",
        _json({"inputs": [_fp32(data=[1, 2, 3, 4, 5, "6"])]}),
        None,
        "FP32 'data' must hold numbers, found strings",
    ),
    (
        "bools in FP32",
        _json({"inputs": [_fp32(data=[True] * 6)]}),
        None,
        "FP32 'data' must hold numbers, found booleans",
    ),
    (
        "null in FP32",
        _json({"inputs": [_fp32(data=[1, 2, None, 4, 5, 6])]}),
        None,
        "FP32 'data' must hold numbers, found nulls",
    ),
    (
        "floats in INT32",
        _json({"inputs": [{"name": "i", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}]}),
        None,
        "INT32 'data' must hold integers, found floating-point numbers",
    ),
    (
        "ints in BOOL",
        _json({"inputs": [{"name": "b", "shape": [2], "datatype": "BOOL", "data": [0, 1]}]}),
        None,
        "BOOL 'data' must hold booleans, found integers",
    ),
    (
        "UINT8 overflow",
        _json({"inputs": [{"name": "u", "shape": [2], "datatype": "UINT8", "data": [1, 300]}]}),
        None,
        "outside the UINT8 range [0, 255]",
    ),
    (
        "negative UINT32",
        _json({"inputs": [{"name": "u", "shape": [1], "datatype": "UINT32", "data": [-1]}]}),
        None,
        "outside the UINT32 range",
    ),
    (
        "ragged data",
        _json({"inputs": [_fp32(data=[[1, 2, 3], [4, 5]])]}),
        None,
        "'data' must be a flat or rectangular nested array of numbers",
    ),
    (
        "data not array",
        _json({"inputs": [{"name": "x", "shape": [], "datatype": "FP32", "data": 1.0}]}),
        None,
        "'data' must be an array, got number",
    ),
    (
        "numbers in BYTES",
        _json({"inputs": [{**_BYTES_IN, "data": ["a", 2]}]}),
        None,
        "BYTES 'data' must hold strings, found number",
    ),
    (
        "ragged BYTES",
        _json({"inputs": [{**_BYTES_IN, "shape": [3], "data": [["a"], ["b", "c"]]}]}),
        None,
        "BYTES 'data' must hold strings, found array",
    ),
    (
        "data too deep",
        _json({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": _deep(65)}]}),
        None,
        "'data' is nested more than 64 levels deep",
    ),
    (
        "unknown field too deep",
        _json({"inputs": [], "extension": _deep(100)}),
        None,
        "request is nested more than 64 levels deep",
    ),
    (
        "unknown input field too deep",
        _json({"inputs": [_fp32(data=_FP32_DATA, extra={"a": _deep(70)})]}),
        None,
        "input 'x' is nested more than 64 levels deep",
    ),
    (
        "nested parameter",
        _json({"inputs": [], "parameters": {"p": {"q": 1}}}),
        None,
        "request parameter 'p' must be a boolean, number or string, got object",
    ),
    (
        "parameters not object",
        _json({"inputs": [_fp32(data=_FP32_DATA, parameters=[1])]}),
        None,
        "input 'x' 'parameters' must be an object, got array",
    ),
    ("id not string", _json({"id": 5, "inputs": []}), None, "'id' must be a string, got number"),
    (
        "binary_data_output not bool",
        _json({"inputs": [], "parameters": {"binary_data_output": "yes"}}),
        None,
        "binary_data_output must be a boolean",
    ),
    (
        "duplicate input",
        _json({"inputs": [_fp32(data=_FP32_DATA), _fp32(data=_FP32_DATA)]}),
        None,
        "input 'x' appears more than once",
    ),
    (
        "outputs not array",
        _json({"inputs": [], "outputs": "y"}),
        None,
        "'outputs' must be an array",
    ),
    (
        "output without name",
        _json({"inputs": [], "outputs": [{"parameters": {}}]}),
        None,
        "outputs[0] is missing required string field 'name'",
    ),
    (
        "output binary_data not bool",
        _json({"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}),
        None,
        "output 'y' parameters.binary_data must be a boolean",
    ),
    (
        "duplicate output",
        _json({"inputs": [], "outputs": [{"name": "y"}, {"name": "y"}]}),
        None,
        "output 'y' is requested more than once",
    ),
    (
        "neither data nor binary",
        _json({"inputs": [_fp32()]}),
        None,
        "input 'x' has neither 'data' nor parameters.binary_data_size",
    ),
    (
        "shared memory",
        _json({"inputs": [_fp32(parameters={"shared_memory_region": "r"})]}),
        None,
        "uses shared memory, which this server does not support",
    ),
    (
        "binary without header length",
        _json({"inputs": [_FP32_24]}),
        None,
        "has parameters.binary_data_size but the request has no Inference-Header-Content-Length",
    ),
    (
        "binary bytes without header length",
        _json({"inputs": [_FP32_24]}) + bytes(24),
        None,
        "malformed JSON",
    ),
    (
        "data and binary",
        *_binary([_fp32(data=_FP32_DATA, parameters={"binary_data_size": 24})], bytes(24)),
        "has both 'data' and parameters.binary_data_size",
    ),
    (
        "negative binary size",
        *_binary([_fp32(parameters={"binary_data_size": -4})]),
        "binary_data_size must be a non-negative integer",
    ),
    (
        "wrong binary size",
        *_binary([_fp32(parameters={"binary_data_size": 20})], bytes(20)),
        "input 'x' has binary_data_size 20 but FP32 shape [2, 3] needs 24 bytes",
    ),
    (
        "truncated binary",
        *_binary([_FP32_24, {**_FP32_24, "name": "y"}], bytes(30)),
        "binary section is truncated: inputs declare 48 bytes after the JSON header "
        "but only 30 are present",
    ),
    (
        "trailing bytes",
        *_binary([_FP32_24], bytes(27)),
        "3 unexpected bytes after the last binary input",
    ),
    (
        "trailing bytes after json-only header",
        *_binary([_fp32(data=_FP32_DATA)], b"junk"),
        "4 unexpected bytes",
    ),
    (
        "header length beyond body",
        b'{"inputs": []}',
        500,
        "Inference-Header-Content-Length is 500 but the body has only 14 bytes",
    ),
    ("negative header length", b'{"inputs": []}', -1, "must be non-negative, got -1"),
    ("zero header length", b'{"inputs": []}', 0, "malformed JSON"),
    (
        "BOOL byte out of range",
        *_binary(
            [
                {
                    "name": "b",
                    "shape": [2],
                    "datatype": "BOOL",
                    "parameters": {"binary_data_size": 2},
                }
            ],
            b"\x01\x02",
        ),
        "input 'b' BOOL bytes must be 0 or 1",
    ),
    (
        "BYTES shape too big for binary size",
        *_binary(
            [{**_BYTES_IN, "shape": [1 << 40], "parameters": {"binary_data_size": 8}}], bytes(8)
        ),
        "binary_data_size 8, too small for 1099511627776 BYTES elements",
    ),
    (
        "BYTES length prefix missing",
        *_binary(
            [{**_BYTES_IN, "parameters": {"binary_data_size": 9}}], struct.pack("<I", 5) + b"abcde"
        ),
        "input 's' binary_data_size 9 holds only 1 of 2 BYTES elements",
    ),
    (
        "BYTES element overruns",
        *_binary(
            [{**_BYTES_IN, "parameters": {"binary_data_size": 8}}], struct.pack("<I", 9) + b"abcd"
        ),
        "input 's' BYTES element 0 declares 9 bytes but only 4 remain",
    ),
    (
        "BYTES leftover",
        *_binary(
            [{**_BYTES_IN, "shape": [1], "parameters": {"binary_data_size": 9}}],
            struct.pack("<I", 3) + b"abcde",
        ),
        "binary_data_size is 9 but its 1 BYTES elements use 7 bytes",
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_request_raises_invalid_input(
    body: bytes, header_length: int | None, message: str
) -> None:
    with pytest.raises(InvalidInput) as excinfo:
        decode_request(body, header_length)
    assert message in excinfo.value.message


def test_limits_are_enforced_before_allocation() -> None:
    huge = {"name": "x", "shape": [1 << 40, 1 << 40], "datatype": "FP32", "data": [1]}
    with pytest.raises(
        InvalidInput, match=r"1208925819614629174706176 elements; the limit is 1000"
    ):
        decode_request(_json({"inputs": [huge]}), max_tensor_elements=1000)
    two = _json({"inputs": [_fp32("a", data=_FP32_DATA), _fp32("b", data=_FP32_DATA)]})
    with pytest.raises(InvalidInput, match="request has 2 inputs; the limit is 1"):
        decode_request(two, max_inputs=1)


def test_mutated_binary_bodies_only_ever_raise_invalid_input() -> None:
    arrays = {"x": _sample("FP32"), "s": _sample("BYTES"), "b": _sample("BOOL")}
    body, header_length = _triton_body(arrays, binary=True)
    assert header_length is not None
    rng = np.random.default_rng(0)
    for _ in range(400):
        mutated = bytearray(body)
        for pos in rng.integers(0, len(body), size=int(rng.integers(1, 4))):
            mutated[pos] = int(rng.integers(0, 256))
        cut = int(rng.integers(0, len(body) + 1))
        length = header_length + int(rng.integers(-3, 4))
        for candidate, hl in ((bytes(mutated), header_length), (body[:cut], length)):
            with contextlib.suppress(InvalidInput):
                decode_request(candidate, hl)


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, None), ("0", 0), (" 42 ", 42), ("123456789", 123456789)]
)
def test_parse_header_length(raw: str | None, expected: int | None) -> None:
    assert parse_header_length(raw) == expected


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "abc", "\u0661\u0662"])
def test_parse_header_length_rejects_garbage(raw: str) -> None:
    with pytest.raises(InvalidInput, match="must be a non-negative integer"):
        parse_header_length(raw)


# --------------------------------------------------------------------------- wire models


def test_wire_models_accept_spec_documents() -> None:
    body, _ = _triton_body({"x": np.ones((1, 2), np.float32)}, binary=False, request_id="a")
    request = InferenceRequest.model_validate_json(body)
    assert request.id == "a" and request.inputs[0].datatype == "FP32"
    assert request.inputs[0].data == [1.0, 1.0]

    metadata = ModelMetadata.model_validate(
        {
            "name": "gated",
            "versions": ["1"],
            "platform": "pytorch",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 40]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
        }
    )
    assert metadata.inputs[0].shape == [-1, 40]
    index = RepositoryIndex.model_validate([{"name": "gated", "version": "1", "state": "READY"}])
    assert index.root[0].state == "READY"
    assert ErrorResponse(error="bad").model_dump() == {"error": "bad"}


def test_wire_models_reject_non_spec_parameters() -> None:
    with pytest.raises(ValueError, match="parameters"):
        InferenceRequest.model_validate({"inputs": [], "parameters": {"p": {"nested": 1}}})
