"""Open Inference Protocol (V2, KServe / Triton) over REST: a thin front end of the data plane.

Handlers translate between HTTP and ``service.dataplane``: the wire format is
``service.protocol``'s, everything a request means is the data plane's. Handlers raise the typed
errors of ``service.errors``; ``service.rest.errors`` turns them into responses.

The inference route is a FastAPI route, so the OpenAPI document declares its request and
response schemas (the pydantic types of ``service.protocol.types``), but its handler reads the
raw body itself (``FastBodyRoute``): no pydantic on tensors and no dependency solving per
request, because on a small model the HTTP handling costs more than the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.routing import request_response

from service.dataplane import DataPlane, InferResponse, Limits
from service.errors import ClientDisconnected, InvalidInput, PayloadTooLarge
from service.protocol.codec import decode_request, encode_response, parse_header_length
from service.protocol.types import (
    DecodedRequest,
    ErrorResponse,
    InferenceResponse,
    ModelMetadata,
    RepositoryIndex,
    RepositoryIndexRequest,
    ServerMetadata,
)

Body = TypeVar("Body", bound=BaseModel)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request: the message names the field and what was expected"),
        (404, "unknown model or version"),
        (413, "body over the size limit"),
        (503, "loading, draining or queue full; retry after Retry-After seconds"),
        (504, "the request's deadline passed while it was queued"),
    )
}
# The request body as the protocol defines it; the JSON schema of InferenceRequest is added
# to the document's components by ``service.rest.openapi``.
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            OCTET_STREAM: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": (
                        "binary tensor extension: the JSON header (its length in the "
                        "Inference-Header-Content-Length header), then the raw tensors"
                    ),
                }
            },
        },
    }
}


# With binary outputs requested, the answer is the JSON header followed by the raw tensors.
_BINARY_OK: dict[int | str, dict[str, Any]] = {
    200: {"content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}},
}


class FastBodyRoute(APIRoute):
    """A documented route whose endpoint takes the ``Request`` and returns a ``Response``
    itself: FastAPI keeps the OpenAPI operation, but the route runs the endpoint as a plain
    Starlette one (no dependency solving, no per-request exit stacks). Added to the app itself,
    not through an included router, whose per-route wrapping would put them back."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.app = request_response(endpoint)


def add_inference_routes(app: FastAPI) -> None:
    """The two inference routes, first among the app's routes: matched before any other."""
    for path in ("/v2/models/{model_name}/infer",
                 "/v2/models/{model_name}/versions/{model_version}/infer"):
        app.router.routes.append(
            FastBodyRoute(
                path, infer, methods=["POST"], response_model=InferenceResponse,
                responses={**_BINARY_OK, **_ERRORS}, openapi_extra=_INFER_BODY,
                summary="Inference", tags=["v2"],
                operation_id=f"infer{'_version' if 'versions' in path else ''}",
            )
        )


def build_router() -> APIRouter:
    """The rest of the V2 API; mounted by ``create_app`` after the inference routes."""
    router = APIRouter(prefix="/v2", tags=["v2"])
    router.add_api_route("/health/live", live, methods=["GET"])
    router.add_api_route("/health/ready", ready, methods=["GET"], responses={503: _ERRORS[503]})
    router.add_api_route("", server_metadata, methods=["GET"], response_model=ServerMetadata)
    for suffix in ("", "/versions/{model_version}"):
        router.add_api_route(
            f"/models/{{model_name}}{suffix}", model_metadata, methods=["GET"],
            response_model=ModelMetadata, responses={404: _ERRORS[404]},
        )
        router.add_api_route(
            f"/models/{{model_name}}{suffix}/ready", model_ready, methods=["GET"],
            responses={404: _ERRORS[404], 503: _ERRORS[503]},
        )
    router.add_api_route(
        "/repository/index", repository_index, methods=["POST"], response_model=RepositoryIndex,
        responses={400: _ERRORS[400]},
    )
    return router


def plane_of(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.plane
    return plane


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=JSON)


# ---------------------------------------------------------------------- health and metadata


async def live() -> Response:
    """Liveness: the process answers HTTP."""
    return _json({"live": True})


async def ready(request: Request) -> Response:
    """Readiness: every model loaded and warmed up, at least one served, and not shutting down
    (else 503 saying which)."""
    plane_of(request).check_serving()
    return _json({"ready": True})


async def server_metadata(request: Request) -> Response:
    return _json(plane_of(request).server_metadata().model_dump())


async def model_metadata(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    meta = plane_of(request).model_metadata(model_name, model_version)
    return _json(meta.model_dump(exclude_none=True))


async def model_ready(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    plane = plane_of(request)
    plane.model_ready(model_name, model_version)
    plane.check_ready()
    return _json({"name": model_name, "ready": True})


async def repository_index(request: Request) -> Response:
    """Model repository extension: every model with its state; ``{"ready": true}`` filters."""
    plane = plane_of(request)
    query = await read_optional_json(
        request, plane, RepositoryIndexRequest, 'repository index body must be {} or '
        '{"ready": true|false}'
    )
    entries = plane.repository_index(query.ready)
    return _json([entry.model_dump() for entry in entries])


async def read_optional_json(
    request: Request, plane: DataPlane, model: type[Body], usage: str
) -> Body:
    """An optional JSON body as ``model`` (its defaults when the body is empty); InvalidInput
    with ``usage`` when it is not one."""
    body = await read_body(request, plane.state.settings.max_request_bytes)
    if not body.strip():
        return model()
    try:
        return model.model_validate_json(body)
    except ValueError:
        raise InvalidInput(usage) from None


# ---------------------------------------------------------------------- inference


async def infer(request: Request) -> Response:
    """V2 inference: JSON or binary tensors in, outputs plus gate and sparsity parameters out."""
    plane = plane_of(request)
    params = request.path_params

    async def decode(limits: Limits) -> DecodedRequest:
        body = await read_body(request, limits.max_request_bytes)
        return decode_request(
            body,
            parse_header_length(request.headers.get(HEADER_LENGTH)),
            max_inputs=limits.max_inputs,
            max_outputs=limits.max_outputs,
            max_tensor_elements=limits.max_tensor_elements,
            max_json_values=limits.max_json_values,
        )

    async def disconnected() -> None:
        # The body has been read, so the next ASGI message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    tracing = plane.tracing.enabled
    result = await plane.infer(
        params["model_name"], params.get("model_version"), decode, protocol="rest",
        trace_carrier=request.headers if tracing else None, disconnected=disconnected,
    )
    return _encode(result)


def _encode(result: InferResponse) -> Response:
    body, header_length = encode_response(
        model_name=result.model_name,
        model_version=result.model_version,
        request_id=result.id,
        outputs=result.outputs,
        parameters=result.parameters,
        binary=result.binary_outputs,
    )
    if header_length is None:
        return Response(body, media_type=JSON)
    return Response(body, media_type=OCTET_STREAM, headers={HEADER_LENGTH: str(header_length)})


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes before and while reading (413)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdecimal():
            raise InvalidInput(f"Content-Length must be a non-negative integer, got {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit} limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the {limit} bytes limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("client disconnected while sending the body") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
