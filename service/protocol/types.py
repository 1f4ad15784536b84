"""V2 (Open Inference Protocol) REST schemas and the internal tensor objects.

The pydantic models mirror the spec's JSON documents and serve the small
endpoints (metadata, repository index, errors) and the OpenAPI schema. The
inference hot path does not go through them: `codec.py` parses inference
bodies directly into the plain dataclasses at the bottom of this file: the
binary section lies outside the JSON document, and large `data` lists should
go straight to numpy rather than through a second validation pass.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    NonNegativeInt,
    RootModel,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]

# The spec allows only scalars as parameter values; strict types stop pydantic
# from quietly turning "1" into 1.
ParameterValue = bool | int | float | str
Parameters = dict[StrictStr, StrictBool | StrictInt | StrictFloat | StrictStr]

# Wire byte order is little-endian whatever the host is.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

_KIND_SIZE_TO_DATATYPE = {(dt.kind, dt.itemsize): name for name, dt in WIRE_DTYPES.items()}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """Return the V2 datatype name for a numpy dtype.

    Object, `bytes_` and `str_` arrays are all BYTES. Raises TypeError for
    dtypes the protocol cannot carry (complex, datetime, ...): that is a
    server-side bug, not a client error.
    """
    if dtype.kind in "OSU":
        return "BYTES"
    name = _KIND_SIZE_TO_DATATYPE.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise TypeError(f"numpy dtype {dtype} has no V2 datatype")
    return name


# --------------------------------------------------------------------------- wire models


class _TensorBody(BaseModel):
    """The V2 tensor object, the same in requests and responses."""

    name: str
    shape: list[NonNegativeInt]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestInput(_TensorBody):
    """One input tensor of an inference request.

    ```
    {"name": $string, "shape": [$number, ...], "datatype": $string,
     "parameters": $parameters (optional), "data": $tensor_data}
    ```
    With the binary tensor extension `data` is absent and
    `parameters.binary_data_size` gives the byte length of the raw tensor.
    """


class RequestOutput(BaseModel):
    """An output the client asks for.

    ```
    {"name": $string, "parameters": $parameters (optional)}
    ```
    `parameters.binary_data: true` asks for this output in binary form.
    """

    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    """Body of `POST /v2/models/{name}[/versions/{v}]/infer`.

    ```
    {"id": $string (optional), "parameters": $parameters (optional),
     "inputs": [$request_input, ...], "outputs": [$request_output, ...] (optional)}
    ```
    Top-level `parameters.binary_data_output: true` asks for every output in binary form.
    """

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_TensorBody):
    """One output tensor of an inference response.

    ```
    {"name": $string, "shape": [$number, ...], "datatype": $string,
     "parameters": $parameters (optional), "data": $tensor_data}
    ```
    Binary outputs carry `parameters.binary_data_size` and no `data`.
    """


class InferenceResponse(BaseModel):
    """Body of a successful inference response.

    ```
    {"model_name": $string, "model_version": $string (optional), "id": $string (optional),
     "parameters": $parameters (optional), "outputs": [$response_output, ...]}
    ```
    """

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ServerMetadata(BaseModel):
    """Body of `GET /v2`.

    ```
    {"name": $string, "version": $string, "extensions": [$string, ...]}
    ```
    """

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    """Declared input or output of a model; -1 marks a variable-size dimension.

    ```
    {"name": $string, "datatype": $string, "shape": [$number, ...]}
    ```
    """

    name: str
    datatype: Datatype
    shape: list[int]


class ModelMetadata(BaseModel):
    """Body of `GET /v2/models/{name}[/versions/{v}]`.

    ```
    {"name": $string, "versions": [$string, ...] (optional), "platform": $string,
     "inputs": [$metadata_tensor, ...], "outputs": [$metadata_tensor, ...]}
    ```
    """

    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RepositoryIndexRequest(BaseModel):
    """Body of `POST /v2/repository/index` (model repository extension).

    ```
    {"ready": $boolean (optional)}
    ```
    """

    ready: bool = False


class RepositoryModel(BaseModel):
    """One entry of the repository index.

    ```
    {"name": $string, "version": $string (optional), "state": $string (optional),
     "reason": $string (optional)}
    ```
    """

    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


class RepositoryIndex(RootModel[list[RepositoryModel]]):
    """Response of `POST /v2/repository/index`: a bare JSON array.

    ```
    [$repository_model, ...]
    ```
    """


class ErrorResponse(BaseModel):
    """Body of every non-2xx response.

    ```
    {"error": $string}
    ```
    """

    error: str


# --------------------------------------------------------------------------- internal objects


@dataclass(slots=True)
class Tensor:
    """A named tensor as the service sees it, independent of how it travelled.

    `array` holds native-endian numbers, or an object array of `bytes` for
    BYTES. Arrays produced by the codec are owned and writable. `parameters`
    excludes transport-only keys such as `binary_data_size`.
    """

    name: str
    array: npt.NDArray[Any]
    parameters: dict[str, ParameterValue] = field(default_factory=dict)

    @property
    def datatype(self) -> str:
        return datatype_of(self.array.dtype)


@dataclass(slots=True, frozen=True)
class RequestedOutput:
    """An output named in the request, with the transport it should use."""

    name: str
    binary: bool
    parameters: dict[str, ParameterValue] = field(default_factory=dict)


@dataclass(slots=True)
class DecodedRequest:
    """An inference request after the wire format has been stripped away.

    `outputs` empty means "every output the model produces". `binary_output`
    is the request-wide default (`parameters.binary_data_output`), already
    removed from `parameters`.
    """

    id: str | None
    parameters: dict[str, ParameterValue]
    inputs: list[Tensor]
    outputs: list[RequestedOutput]
    binary_output: bool

    def binary_output_names(self, produced: Iterable[str]) -> set[str]:
        """Names among `produced` that must be sent in binary form.

        A per-output `binary_data` flag wins over the request-wide default.
        """
        explicit = {o.name: o.binary for o in self.outputs}
        return {name for name in produced if explicit.get(name, self.binary_output)}
