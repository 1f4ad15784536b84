"""Decode V2 inference request bodies and encode responses, numpy only.

Two transports share one JSON document:

* JSON tensors: each input carries `data`, a flat or nested row-major list.
* Binary tensor extension: the JSON header is the first
  `Inference-Header-Content-Length` bytes; inputs carry
  `parameters.binary_data_size` instead of `data`, and their raw little-endian
  bytes follow the header in input order. BYTES elements are each prefixed
  with a 4-byte little-endian length.

Every defect in client bytes surfaces as `InvalidInput` with a message that
names the field; nothing else escapes `decode_request`. Non-finite floats are
decoded like any other value: whether they are acceptable is model policy.
"""

import json
import math
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from service.protocol.errors import InvalidInput, PayloadTooLarge, shown
from service.protocol.types import (
    WIRE_DTYPES,
    DecodedRequest,
    ParameterValue,
    RequestedOutput,
    Tensor,
)

# Deeper JSON than this is never legitimate here and only costs CPU; 64 is also
# numpy's maximum rank, so tensor data and shapes share the bound.
MAX_DEPTH = 64

_NATIVE_DTYPES = {name: dt.newbyteorder("=") for name, dt in WIRE_DTYPES.items()}
_INT_DATATYPES = frozenset(n for n, dt in WIRE_DTYPES.items() if dt.kind in "iu")
_KIND_NAMES = {
    "b": "booleans",
    "i": "integers",
    "u": "integers",
    "f": "floating-point numbers",
    "U": "strings",
    "O": "nulls, objects or integers beyond 64 bits",
}
_TYPE_NAMES = {
    float: "floating-point numbers",
    str: "strings",
    bool: "booleans",
    type(None): "nulls",
}
_LENGTH_PREFIX = struct.Struct("<I")
_MAX_DIMENSION = 2**62  # any larger cannot be a numpy dimension
_SUPPORTED = ", ".join(WIRE_DTYPES)


def parse_header_length(value: str | None) -> int | None:
    """Parse the `Inference-Header-Content-Length` header; None when absent."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdecimal()):
        raise InvalidInput(
            f"Inference-Header-Content-Length must be a non-negative integer, got {value[:32]!r}"
        )
    return int(text)


def decode_request(
    body: bytes,
    header_length: int | None = None,
    *,
    max_inputs: int | None = None,
    max_tensor_elements: int | None = None,
    max_outputs: int | None = None,
    max_json_values: int | None = None,
) -> DecodedRequest:
    """Parse an inference request body into numpy tensors.

    `header_length` is the `Inference-Header-Content-Length` value, or None
    when the whole body is JSON. `max_inputs` and `max_tensor_elements` bound
    the work a single request can demand before any tensor is allocated;
    `max_json_values` bounds the JSON document before it is parsed: a scan
    (three byte counts, no parsing) gives an upper bound of its values.
    Returned arrays are owned, writable and native-endian; BYTES tensors are
    object arrays of `bytes`. Raises InvalidInput for any malformed body.
    """
    if header_length is not None:
        if header_length < 0:
            raise InvalidInput(
                f"Inference-Header-Content-Length must be non-negative, got {header_length}"
            )
        if header_length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length} "
                f"but the body has only {len(body)} bytes"
            )
    view = memoryview(body)
    text = view if header_length is None else view[:header_length]
    if max_json_values is not None:
        _check_json_values(text, max_json_values)
    doc = _load_json(text)
    if not isinstance(doc, dict):
        raise InvalidInput(f"request body must be a JSON object, got {_json_type(doc)}")
    _check_unknown_keys(doc, {"id", "parameters", "inputs", "outputs"}, "request", 1)

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {_json_type(request_id)}")
    parameters = _parameters(doc.get("parameters"), "request")
    binary_output = parameters.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInput("parameters.binary_data_output must be a boolean")

    raw_inputs = doc.get("inputs")
    if raw_inputs is None:
        raise InvalidInput("request is missing required field 'inputs'")
    if not isinstance(raw_inputs, list):
        raise InvalidInput(f"'inputs' must be an array, got {_json_type(raw_inputs)}")
    if max_inputs is not None and len(raw_inputs) > max_inputs:
        raise InvalidInput(f"request has {len(raw_inputs)} inputs; the limit is {max_inputs}")

    inputs: list[Tensor] = []
    names: set[str] = set()
    pending: list[tuple[Tensor, _BinaryLayout]] = []
    for index, raw in enumerate(raw_inputs):
        tensor, layout = _decode_input(raw, index, max_tensor_elements)
        if tensor.name in names:
            raise InvalidInput(f"input {shown(tensor.name)} appears more than once")
        names.add(tensor.name)
        inputs.append(tensor)
        if layout is not None:
            pending.append((tensor, layout))

    start = len(body) if header_length is None else header_length
    if pending and header_length is None:
        raise InvalidInput(
            f"input {pending[0][0].name!r} has parameters.binary_data_size "
            "but the request has no Inference-Header-Content-Length header"
        )
    needed = sum(layout.size for _, layout in pending)
    available = len(body) - start
    if available < needed:
        raise InvalidInput(
            f"binary section is truncated: inputs declare {needed} bytes after the "
            f"JSON header but only {available} are present"
        )
    if available > needed:
        raise InvalidInput(
            f"{available - needed} unexpected bytes after the last binary input "
            f"(inputs declare {needed} bytes, {available} follow the JSON header)"
        )
    for tensor, layout in pending:
        section = view[start : start + layout.size]
        tensor.array = _from_binary(section, layout, f"input {tensor.name!r}")
        start += layout.size

    return DecodedRequest(
        id=request_id,
        parameters=parameters,
        inputs=inputs,
        outputs=_decode_outputs(doc.get("outputs"), max_outputs),
        binary_output=binary_output,
    )


def encode_response(
    *,
    model_name: str,
    outputs: Sequence[Tensor],
    model_version: str | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, ParameterValue] | None = None,
    binary: bool | Collection[str] = False,
) -> tuple[bytes, int | None]:
    """Serialise an inference response; returns `(body, header_length)`.

    `binary` is True/False for every output, or the names to send in binary
    form. `header_length` is None when no output is binary; otherwise it must
    be sent as `Inference-Header-Content-Length`. JSON has no NaN or Infinity,
    so JSON outputs carry them as null; binary outputs preserve them.
    Raises InvalidInput when a BYTES output that is not UTF-8 is requested as
    JSON, and TypeError for arrays with no V2 datatype.
    """
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)

    chunks: list[bytes] = []
    any_binary = False
    entries: list[dict[str, Any]] = []
    for tensor in outputs:
        datatype = tensor.datatype
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": datatype,
            "shape": list(tensor.array.shape),
        }
        out_params: dict[str, ParameterValue] = dict(tensor.parameters)
        as_binary = binary if isinstance(binary, bool) else tensor.name in binary
        if as_binary:
            raw = _to_binary(tensor.array, datatype)
            out_params["binary_data_size"] = len(raw)
            chunks.append(raw)
            any_binary = True
        else:
            out_params.pop("binary_data_size", None)
            entry["data"] = _to_json_data(tensor.array, datatype, tensor.name)
        if out_params:
            entry["parameters"] = out_params
        entries.append(entry)
    doc["outputs"] = entries

    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not any_binary:
        return header, None
    return b"".join([header, *chunks]), len(header)


# --------------------------------------------------------------------------- decoding helpers


def json_values_bound(raw: bytes | memoryview) -> int:
    """An upper bound of the values in a JSON document, without parsing it: a container of n
    values holds n − 1 commas, so values ≤ commas + containers + 1 (brackets inside strings
    only raise the bound). Byte counts run in C at memory speed."""
    data = raw if isinstance(raw, bytes) else raw.tobytes()
    return data.count(b",") + data.count(b"[") + data.count(b"{") + 1


def _check_json_values(raw: memoryview, limit: int) -> None:
    # The parser's work and memory (a Python object per value) grow with the values, not the
    # bytes: a body of tiny values under the byte limit would still cost hundreds of ms.
    whole = raw.obj  # the body itself when the view spans it: counted without a copy
    entire = isinstance(whole, bytes) and raw.nbytes == len(whole)
    bound = json_values_bound(whole if entire else raw)  # type: ignore[arg-type]
    if bound > limit:
        raise PayloadTooLarge(
            f"JSON document has up to {bound} values; this model accepts at most {limit} "
            "(its largest request's tensor elements, plus room for names and parameters)"
        )


def _load_json(raw: memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        error = InvalidInput(f"malformed JSON: {exc}")
    # tritonclient's JSON mode writes NaN/Infinity literals, which strict JSON
    # (orjson) refuses. The stdlib accepts them; re-serialising with orjson then
    # rejects what only the stdlib tolerates (lone surrogates, huge integers).
    text = bytes(raw)
    if b"NaN" not in text and b"Infinity" not in text:
        raise error
    try:
        doc = json.loads(text)
        orjson.dumps(doc)
    except (ValueError, TypeError, RecursionError):
        raise error from None
    return doc


@dataclass(frozen=True, slots=True)
class _BinaryLayout:
    """Where a binary input's bytes go once the section after the header is located."""

    datatype: str
    shape: list[int]
    count: int
    size: int


def _object_name(raw: Any, array: str, index: int) -> str:
    """The ``name`` of the object at ``array[index]``; InvalidInput if it is not a named object."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"{array}[{index}] must be an object, got {_json_type(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{array}[{index}] is missing required string field 'name'")
    return name


def _decode_input(
    raw: Any, index: int, max_elements: int | None
) -> tuple[Tensor, _BinaryLayout | None]:
    """Build the tensor for one input; binary inputs come back with their array unset."""
    name = _object_name(raw, "inputs", index)
    where = f"input {shown(name)}"
    _check_unknown_keys(raw, {"name", "shape", "datatype", "parameters", "data"}, where, 3)
    for key in ("shape", "datatype"):
        if key not in raw:
            raise InvalidInput(f"{where} is missing required field {key!r}")

    datatype = raw["datatype"]
    if not isinstance(datatype, str):
        raise InvalidInput(f"{where} has unknown datatype {datatype!r}; supported: {_SUPPORTED}")
    check_datatype(datatype, where)
    shape, count = check_shape(_shape(raw["shape"], where), where, max_elements)

    parameters = _parameters(raw.get("parameters"), where)
    if "shared_memory_region" in parameters:
        raise InvalidInput(f"{where} uses shared memory, which this server does not support")
    size = parameters.pop("binary_data_size", None)
    data = raw.get("data")
    if size is None:
        if data is None:
            raise InvalidInput(f"{where} has neither 'data' nor parameters.binary_data_size")
        return Tensor(name, _from_json_data(data, datatype, shape, count, where), parameters), None

    if data is not None:
        raise InvalidInput(f"{where} has both 'data' and parameters.binary_data_size; send one")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"{where} parameters.binary_data_size must be a non-negative integer")
    _check_size(datatype, shape, count, size, f"{where} has binary_data_size {size}")
    placeholder = np.empty(0, dtype=_NATIVE_DTYPES[datatype])
    return Tensor(name, placeholder, parameters), _BinaryLayout(datatype, shape, count, size)


def _shape(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, list):
        raise InvalidInput(f"{where} 'shape' must be an array of integers, got {_json_type(raw)}")
    if len(raw) > MAX_DEPTH:
        raise InvalidInput(f"{where} has {len(raw)} dimensions; at most {MAX_DEPTH} are supported")
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise InvalidInput(f"{where} 'shape' must contain only integers, got {raw!r}")
    return raw


def _parameters(raw: Any, where: str) -> dict[str, ParameterValue]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where} 'parameters' must be an object, got {_json_type(raw)}")
    for key, value in raw.items():
        if not isinstance(value, bool | int | float | str):
            raise InvalidInput(
                f"{where} parameter {key!r} must be a boolean, number or string, "
                f"got {_json_type(value)}"
            )
    return dict(raw)


def _decode_outputs(raw: Any, max_outputs: int | None) -> list[RequestedOutput]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidInput(f"'outputs' must be an array, got {_json_type(raw)}")
    if max_outputs is not None and len(raw) > max_outputs:
        raise InvalidInput(f"request asks for {len(raw)} outputs; the limit is {max_outputs}")
    outputs: list[RequestedOutput] = []
    names: set[str] = set()
    for index, item in enumerate(raw):
        name = _object_name(item, "outputs", index)
        where = f"output {shown(name)}"
        _check_unknown_keys(item, {"name", "parameters"}, where, 3)
        if name in names:
            raise InvalidInput(f"{where} is requested more than once")
        names.add(name)
        parameters = _parameters(item.get("parameters"), where)
        binary = parameters.pop("binary_data", False)
        if not isinstance(binary, bool):
            raise InvalidInput(f"{where} parameters.binary_data must be a boolean")
        outputs.append(RequestedOutput(name, binary, parameters))
    return outputs


def _check_unknown_keys(obj: dict[str, Any], known: set[str], where: str, depth: int) -> None:
    """Bound the nesting of fields we ignore; known fields are bounded by their own checks.

    Iterative, so a hostile document cannot exhaust the Python stack.
    """
    stack = [(value, depth + 1) for key, value in obj.items() if key not in known]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Collection[Any] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if level > MAX_DEPTH:
            raise InvalidInput(f"{where} is nested more than {MAX_DEPTH} levels deep")
        stack.extend((child, level + 1) for child in children)


def _from_json_data(
    data: Any, datatype: str, shape: list[int], count: int, where: str
) -> npt.NDArray[Any]:
    if not isinstance(data, list):
        raise InvalidInput(f"{where} 'data' must be an array, got {_json_type(data)}")
    # numpy's own limit on nesting would surface as an opaque ValueError; walking
    # the first path is O(depth) and catches it with a clear message.
    probe: Any = data
    for _ in range(MAX_DEPTH):
        if not isinstance(probe, list) or not probe:
            break
        probe = probe[0]
    else:
        if isinstance(probe, list):
            raise InvalidInput(f"{where} 'data' is nested more than {MAX_DEPTH} levels deep")

    if datatype == "BYTES":
        return _bytes_from_json(data, shape, count, where)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            f"{where} 'data' must be a flat or rectangular nested array of numbers"
        ) from None
    _check_count(array.size, shape, count, where)
    native = _NATIVE_DTYPES[datatype]
    if array.size == 0:
        return array.astype(native).reshape(shape)
    if datatype == "BOOL":
        _require_kind(array, "b", "booleans", datatype, where)
    elif datatype not in _INT_DATATYPES:
        _require_kind(array, "iuf", "numbers", datatype, where)
    else:
        if array.dtype.kind in "fO":
            # numpy widens a mix of int64-range and uint64-only integers to float64,
            # and keeps integers beyond 64 bits as objects: re-check each element.
            return _exact_integers(data, datatype, where).reshape(shape)
        _require_kind(array, "iu", "integers", datatype, where)
        info = np.iinfo(native)
        if array.min() < info.min or array.max() > info.max:
            raise _out_of_range(datatype, where)
    return array.astype(native, copy=False).reshape(shape)


def _require_kind(
    array: npt.NDArray[Any], allowed: str, expected: str, datatype: str, where: str
) -> None:
    if array.dtype.kind not in allowed:
        found = _KIND_NAMES.get(array.dtype.kind, str(array.dtype))
        raise InvalidInput(f"{where} {datatype} 'data' must hold {expected}, found {found}")


def _exact_integers(data: list[Any], datatype: str, where: str) -> npt.NDArray[Any]:
    flat = np.array(data, dtype=object).reshape(-1)
    for item in flat:
        if isinstance(item, bool) or not isinstance(item, int):
            found = _TYPE_NAMES.get(type(item), "objects")
            raise InvalidInput(f"{where} {datatype} 'data' must hold integers, found {found}")
    try:
        return np.array(flat.tolist(), dtype=_NATIVE_DTYPES[datatype])
    except OverflowError:
        raise _out_of_range(datatype, where) from None


def _out_of_range(datatype: str, where: str) -> InvalidInput:
    info = np.iinfo(_NATIVE_DTYPES[datatype])
    return InvalidInput(
        f"{where} 'data' has values outside the {datatype} range [{info.min}, {info.max}]"
    )


def _bytes_from_json(data: list[Any], shape: list[int], count: int, where: str) -> npt.NDArray[Any]:
    try:
        nested = np.array(data, dtype=object)
    except (ValueError, TypeError):
        raise InvalidInput(f"{where} 'data' must be a flat or rectangular nested array") from None
    flat = nested.reshape(-1)
    for item in flat:
        # A list here means the nesting was ragged: numpy keeps the leftovers as objects.
        if not isinstance(item, str):
            raise InvalidInput(f"{where} BYTES 'data' must hold strings, found {_json_type(item)}")
    _check_count(flat.size, shape, count, where)
    out = np.empty(count, dtype=object)
    out[:] = [item.encode("utf-8") for item in flat]
    return out.reshape(shape)


def _from_binary(raw: memoryview, layout: _BinaryLayout, where: str) -> npt.NDArray[Any]:
    if layout.datatype == "BYTES":
        return _bytes_from_binary(raw, layout.shape, layout.count, where)
    wire = np.frombuffer(raw, dtype=WIRE_DTYPES[layout.datatype])
    if layout.datatype == "BOOL" and (wire.view(np.uint8) > 1).any():
        raise InvalidInput(f"{where} BOOL bytes must be 0 or 1")
    # astype copies: callers get an owned, aligned, writable array, not a view of the body.
    return wire.astype(_NATIVE_DTYPES[layout.datatype]).reshape(layout.shape)


def _bytes_from_binary(
    raw: memoryview, shape: list[int], count: int, where: str
) -> npt.NDArray[Any]:
    out = np.empty(count, dtype=object)
    offset, end = 0, len(raw)
    for i in range(count):
        if offset + 4 > end:
            raise InvalidInput(
                f"{where} binary_data_size {end} holds only {i} of {count} BYTES elements"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"{where} BYTES element {i} declares {length} bytes "
                f"but only {end - offset} remain in binary_data_size {end}"
            )
        out[i] = bytes(raw[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidInput(
            f"{where} binary_data_size is {end} but its {count} BYTES elements use {offset} bytes"
        )
    return out.reshape(shape)


def _check_count(got: int, shape: list[int], expected: int, where: str) -> None:
    if got != expected:
        raise InvalidInput(f"{where} 'data' has {got} elements but shape {shape} needs {expected}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


# --------------------------------------------------------------------------- encoding helpers


def _to_binary(array: npt.NDArray[Any], datatype: str) -> bytes:
    if datatype != "BYTES":
        return array.astype(WIRE_DTYPES[datatype], copy=False).tobytes()
    parts: list[bytes] = []
    for item in array.reshape(-1):
        raw = _element_bytes(item)
        parts.append(_LENGTH_PREFIX.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _to_json_data(array: npt.NDArray[Any], datatype: str, name: str) -> Any:
    if datatype != "BYTES":
        # orjson serialises contiguous native-endian arrays without a Python list.
        return np.ascontiguousarray(array, dtype=_NATIVE_DTYPES[datatype]).reshape(-1)
    items: list[str] = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            items.append(item)
            continue
        try:
            items.append(_element_bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output {name!r} holds bytes that are not UTF-8 and cannot be sent as JSON; "
                "request it with parameters.binary_data = true"
            ) from None
    return items


def _element_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    raise TypeError(f"BYTES tensors must hold bytes or str, got {type(item).__name__}")


# --------------------------------------------------------------------------- raw tensors


def tensor_from_bytes(
    raw: bytes | memoryview, datatype: str, shape: list[int], where: str
) -> npt.NDArray[Any]:
    """An owned, native-endian array of ``datatype`` and ``shape`` from its little-endian
    bytes (BYTES: each element with a 4-byte length prefix), as the binary extension and gRPC's
    raw contents carry tensors. Raises InvalidInput when the size does not match."""
    count = math.prod(shape)
    size = len(raw)
    _check_size(datatype, shape, count, size, f"{where} has {size} bytes")
    view = raw if isinstance(raw, memoryview) else memoryview(raw)
    return _from_binary(view, _BinaryLayout(datatype, shape, count, size), where)


def _check_size(datatype: str, shape: list[int], count: int, size: int, what: str) -> None:
    """Raw bytes must fit the shape: exactly for fixed-size datatypes, at least the length
    prefixes for BYTES (checked before parsing, so a huge shape cannot make us allocate per
    element). ``what`` opens the message ("input 'x' has 12 bytes")."""
    if datatype == "BYTES":
        if size < 4 * count:
            raise InvalidInput(
                f"{what}, too small for {count} BYTES elements with their 4-byte length prefixes"
            )
    elif size != count * WIRE_DTYPES[datatype].itemsize:
        raise InvalidInput(
            f"{what} but {datatype} shape {shape} needs "
            f"{count * WIRE_DTYPES[datatype].itemsize} bytes"
        )


def tensor_to_bytes(array: npt.NDArray[Any], datatype: str) -> bytes:
    """The little-endian bytes of ``array`` (BYTES: length-prefixed elements)."""
    return _to_binary(array, datatype)


def check_shape(raw: Sequence[int], where: str, max_elements: int | None) -> tuple[list[int], int]:
    """A shape from a decoded message: rank, signs and element count bounded. Returns the
    shape as a list and its element count."""
    if len(raw) > MAX_DEPTH:
        raise InvalidInput(f"{where} has {len(raw)} dimensions; at most {MAX_DEPTH} are supported")
    shape = [int(d) for d in raw]
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where} 'shape' {shape} has a negative dimension")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise InvalidInput(
            f"{where} has shape {shape} with {count} elements; the limit is {max_elements}"
        )
    # Each dimension on its own too: [0, 2**62] holds no element but no array has that shape.
    largest = max_elements if max_elements is not None else _MAX_DIMENSION
    if any(d > largest for d in shape):
        raise InvalidInput(
            f"{where} 'shape' {shape} has a dimension over the limit of {largest} elements"
        )
    return shape, count


def check_datatype(datatype: str, where: str) -> str:
    if datatype not in WIRE_DTYPES:
        raise InvalidInput(f"{where} has unknown datatype {datatype!r}; supported: {_SUPPORTED}")
    return datatype
