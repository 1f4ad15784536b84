"""``ModelInferRequest`` -> ``DecodedRequest`` and ``InferResponse`` -> ``ModelInferResponse``.

Inputs come either all as ``raw_input_contents`` (one little-endian byte string per input, in
input order: what tritonclient sends) or all as typed ``contents``. Outputs always go back as
``raw_output_contents``, as Triton answers. Every defect names the input and what was expected
(InvalidInput: INVALID_ARGUMENT); the limits are checked before any tensor is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from service.dataplane import InferResponse, Limits
from service.grpc import messages
from service.protocol.codec import check_datatype, check_shape, tensor_from_bytes, tensor_to_bytes
from service.protocol.errors import InvalidInput, shown
from service.protocol.types import (
    WIRE_DTYPES,
    DecodedRequest,
    ParameterValue,
    RequestedOutput,
    Tensor,
)

# Parameters of one request, input or output: V2 defines a handful; more is not a client.
MAX_PARAMETERS = 64
# Which typed-contents field carries each datatype, and the narrower range it must fit.
_CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters_from(entries: Mapping[str, Any], where: str) -> dict[str, ParameterValue]:
    """An ``InferParameter`` map as plain values."""
    if len(entries) > MAX_PARAMETERS:
        raise InvalidInput(f"{where} has {len(entries)} parameters; the limit is {MAX_PARAMETERS}")
    out: dict[str, ParameterValue] = {}
    for key, param in entries.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidInput(f"{where} parameter {shown(key)} has no value")
        out[key] = getattr(param, choice)
    return out


def fill_parameters(target: Any, values: Mapping[str, ParameterValue]) -> None:
    """Write plain values into an ``InferParameter`` map."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)


def decode_infer_request(request: Any, limits: Limits) -> DecodedRequest:
    """The protocol-agnostic request of a ``ModelInferRequest``; raises InvalidInput."""
    inputs = request.inputs
    if len(inputs) > limits.max_inputs:
        raise InvalidInput(f"request has {len(inputs)} inputs; the limit is {limits.max_inputs}")
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(inputs):
        raise InvalidInput(
            f"request has {len(inputs)} inputs but {len(raw_contents)} raw_input_contents; "
            "send one per input, in input order, or use typed contents for all"
        )
    tensors: list[Tensor] = []
    names: set[str] = set()
    for index, item in enumerate(inputs):
        name = item.name
        if not name:
            raise InvalidInput(f"inputs[{index}] has no name")
        where = f"input {shown(name)}"
        if name in names:
            raise InvalidInput(f"{where} appears more than once")
        names.add(name)
        datatype = check_datatype(item.datatype, where)
        shape, count = check_shape(item.shape, where, limits.max_tensor_elements)
        parameters = parameters_from(item.parameters, where)
        if "shared_memory_region" in parameters:
            raise InvalidInput(f"{where} uses shared memory, which this server does not support")
        if raw_contents:
            if item.HasField("contents"):
                raise InvalidInput(
                    f"{where} has typed contents and the request raw_input_contents; send one"
                )
            array = tensor_from_bytes(raw_contents[index], datatype, shape, where)
        else:
            array = _from_contents(item, datatype, shape, count, where)
        tensors.append(Tensor(name, array, parameters))

    if len(request.outputs) > limits.max_outputs:
        raise InvalidInput(
            f"request asks for {len(request.outputs)} outputs; the limit is {limits.max_outputs}"
        )
    outputs: list[RequestedOutput] = []
    wanted: set[str] = set()
    for index, out in enumerate(request.outputs):
        if not out.name:
            raise InvalidInput(f"outputs[{index}] has no name")
        if out.name in wanted:
            raise InvalidInput(f"output {shown(out.name)} is requested more than once")
        wanted.add(out.name)
        params = parameters_from(out.parameters, f"output {shown(out.name)}")
        outputs.append(RequestedOutput(out.name, True, params))

    parameters = parameters_from(request.parameters, "request")
    parameters.pop("binary_data_output", None)  # a REST transport option; gRPC is always raw
    return DecodedRequest(
        id=request.id or None,
        parameters=parameters,
        inputs=tensors,
        outputs=outputs,
        binary_output=True,
    )


def _from_contents(
    item: Any, datatype: str, shape: list[int], count: int, where: str
) -> npt.NDArray[Any]:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(
            f"{where}: {datatype} has no typed contents field; send it as raw_input_contents"
        )
    values = getattr(item.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"{where} has {len(values)} values in contents.{field} but shape {shape} "
            f"needs {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    native = WIRE_DTYPES[datatype].newbyteorder("=")
    wide = np.array(values, dtype=np.float64 if native.kind == "f" else None)
    if native.kind in "iu" and wide.size:
        info = np.iinfo(native)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise InvalidInput(
                f"{where} contents.{field} has values outside the {datatype} range "
                f"[{info.min}, {info.max}]"
            )
    return wide.astype(native).reshape(shape)


def encode_infer_response(result: InferResponse) -> Any:
    """A ``ModelInferResponse`` carrying every output as raw contents."""
    response = messages.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=result.id or ""
    )
    fill_parameters(response.parameters, result.parameters)
    for tensor in result.outputs:
        datatype = tensor.datatype
        out = response.outputs.add(name=tensor.name, datatype=datatype)
        out.shape.extend(tensor.array.shape)
        fill_parameters(out.parameters, tensor.parameters)
        response.raw_output_contents.append(tensor_to_bytes(tensor.array, datatype))
    return response
