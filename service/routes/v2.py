"""Open Inference Protocol (V2, KServe / Triton) REST endpoints.

Handlers translate between HTTP and the service: the wire format is ``service.protocol``'s, the
model behind is reached through the batcher (or directly, one forward per request, when batching
is off). Handlers raise the typed errors of ``service.errors`` and never build error responses.

The inference path is kept lean on purpose (no pydantic on tensors, orjson, no per-request
logging): on a small model the HTTP handling costs more than the forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from models.gate_config import GATE_PARAMETERS
from service.engine import INPUT_NAME, OUTPUT_NAME, FloatArray, GateConfig, ItemResult, ModelInfo
from service.errors import (
    ClientDisconnected,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    ServerNotReady,
    ServiceError,
    Unavailable,
)
from service.protocol.codec import decode_request, encode_response, parse_header_length
from service.protocol.types import (
    DecodedRequest,
    ModelMetadata,
    ParameterValue,
    RepositoryIndexRequest,
    RepositoryModel,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)
from service.state import ModelRuntime, ServiceState

logger = logging.getLogger(__name__)

SERVER_NAME = "gated-serve"
EXTENSIONS = ["binary_tensor_data", "model_repository", "parameters"]
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"

# Requests are single-input; a small bound keeps hostile headers from costing work.
_MAX_INPUTS = 4
# Outcome and rejection reason of each error a request can end with (see service.metrics).
_ACCOUNTING: dict[type[Exception], tuple[str, str | None]] = {
    InvalidInput: ("invalid", "invalid_input"),
    PayloadTooLarge: ("invalid", "body_too_large"),
    ModelNotFound: ("invalid", "unknown_model"),
    QueueFull: ("rejected", "queue_full"),
    ServerNotReady: ("rejected", "not_ready"),
    Unavailable: ("rejected", "not_ready"),
    RequestTimeout: ("timeout", "timeout"),
    ClientDisconnected: ("cancelled", "client_disconnected"),
}


def build_router() -> APIRouter:
    """The V2 router; mounted by ``create_app``."""
    router = APIRouter(prefix="/v2", tags=["v2"])
    # Inference first, as plain Starlette routes: matched before anything else and without
    # FastAPI's per-request dependency solving, about a tenth of the per-request CPU here.
    # (add_route does not apply the router prefix itself.)
    infer_path = f"{router.prefix}/models/{{model_name}}"
    router.add_route(f"{infer_path}/infer", infer, methods=["POST"])
    router.add_route(f"{infer_path}/versions/{{model_version}}/infer", infer, methods=["POST"])
    router.add_api_route("/health/live", live, methods=["GET"])
    router.add_api_route("/health/ready", ready, methods=["GET"])
    router.add_api_route("", server_metadata, methods=["GET"])
    router.add_api_route("/models/{model_name}", model_metadata, methods=["GET"])
    router.add_api_route(
        "/models/{model_name}/versions/{model_version}", model_metadata, methods=["GET"]
    )
    router.add_api_route("/models/{model_name}/ready", model_ready, methods=["GET"])
    router.add_api_route(
        "/models/{model_name}/versions/{model_version}/ready", model_ready, methods=["GET"]
    )
    router.add_api_route("/repository/index", repository_index, methods=["POST"])
    return router


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=JSON)


# ---------------------------------------------------------------------- health and metadata


async def live() -> Response:
    """Liveness: the process answers HTTP."""
    return _json({"live": True})


async def ready(request: Request) -> Response:
    """Readiness: every model loaded and warmed up, and not shutting down (else 503)."""
    _state(request).check_ready()
    return _json({"ready": True})


async def server_metadata(request: Request) -> Response:
    meta = ServerMetadata(name=SERVER_NAME, version=_state(request).version, extensions=EXTENSIONS)
    return _json(meta.model_dump())


async def model_metadata(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    info = _state(request).model(model_name, model_version).info
    meta = ModelMetadata(
        name=info.name,
        versions=[info.version],
        platform=info.platform,
        inputs=[
            TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
            for t in info.contract.inputs
        ],
        outputs=[
            TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
            for t in info.contract.outputs
        ],
    )
    return _json(meta.model_dump(exclude_none=True))


async def model_ready(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    state = _state(request)
    runtime = state.model(model_name, model_version)
    state.check_ready()
    return _json({"name": runtime.info.name, "ready": True})


async def repository_index(request: Request) -> Response:
    """Model repository extension: every model with its state; ``{"ready": true}`` filters."""
    body = await read_body(request, _state(request).settings.max_request_bytes)
    try:
        query = RepositoryIndexRequest.model_validate_json(body) if body.strip() else None
    except ValueError:
        raise InvalidInput('repository index body must be {} or {"ready": true|false}') from None
    state = _state(request)
    entries = []
    for runtime in state.models.values():
        serving = state.ready
        if query is not None and query.ready and not serving:
            continue
        entries.append(
            RepositoryModel(
                name=runtime.info.name,
                version=runtime.info.version,
                state="READY" if serving else "UNAVAILABLE",
                reason="" if serving else "server is loading or shutting down",
            ).model_dump()
        )
    return _json(entries)


# ---------------------------------------------------------------------- inference


async def infer(request: Request) -> Response:
    """V2 inference: JSON or binary tensors in, logits plus gate and sparsity parameters out."""
    model_name: str = request.path_params["model_name"]
    model_version: str | None = request.path_params.get("model_version")
    state = _state(request)
    start = time.monotonic()
    metrics = state.metrics
    runtime: ModelRuntime | None = None
    request_id: str | None = None
    try:
        runtime = state.model(model_name, model_version)
        runtime.inflight += 1
        try:
            state.check_ready()
            settings = state.settings
            body = await read_body(request, settings.max_request_bytes)
            decoded = decode_request(
                body,
                parse_header_length(request.headers.get(HEADER_LENGTH)),
                max_inputs=_MAX_INPUTS,
                max_tensor_elements=settings.max_request_rows * runtime.info.max_length
                * runtime.info.in_channels,
            )
            request_id = decoded.id
            array = _model_input(decoded, runtime.info, settings.max_request_rows,
                                 settings.allow_non_finite)
            gate, timeout_s = _request_options(state, runtime, decoded.parameters)
            result = await _run(state, runtime, gate, array, timeout_s, request_id, request)
            response = _response(
                runtime.info, decoded, gate, result, settings.allow_non_finite
            )
        finally:
            runtime.inflight -= 1
    except Exception as err:
        _account_failure(state, runtime, err, request_id)
        if isinstance(err, (ServiceError, InvalidInput)):
            raise
        logger.exception("request %s to model %s failed", request_id, model_name)
        raise ServiceError("internal error") from None
    if metrics is not None:
        name = runtime.info.name
        metrics.requests.labels(name, "success").inc()
        metrics.request_seconds.labels(name).observe(time.monotonic() - start)
        metrics.active_channel_ratio.labels(name, gate.mode).observe(result.active_channel_ratio)
        metrics.flops_ratio.labels(name, gate.mode).observe(result.flops_ratio)
        for layer, ratio in zip(runtime.info.layers, result.layer_active_ratios, strict=True):
            metrics.layer_active_ratio.labels(name, layer).observe(ratio)
    return response


def _account_failure(
    state: ServiceState, runtime: ModelRuntime | None, err: Exception, request_id: str | None
) -> None:
    metrics = state.metrics
    outcome, reason = "error", None
    for kind in type(err).__mro__:
        if kind in _ACCOUNTING:
            outcome, reason = _ACCOUNTING[kind]
            break
    if metrics is not None:
        if reason is not None:
            metrics.rejected.labels(reason).inc()
        if runtime is not None:
            metrics.requests.labels(runtime.info.name, outcome).inc()
    if outcome in ("timeout", "error") and isinstance(err, ServiceError):
        logger.warning("request %s: %s", request_id, err.message)


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
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit} bytes limit")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _model_input(
    decoded: DecodedRequest, info: ModelInfo, max_rows: int, allow_non_finite: bool
) -> FloatArray:
    """The request's tensor as (rows, T, C) float32, validated against the model."""
    if len(decoded.inputs) != 1 or decoded.inputs[0].name != INPUT_NAME:
        names = ", ".join(repr(t.name) for t in decoded.inputs) or "none"
        raise InvalidInput(
            f"model {info.name!r} takes exactly one input named {INPUT_NAME!r}; got {names}"
        )
    for out in decoded.outputs:
        if out.name != OUTPUT_NAME:
            raise InvalidInput(
                f"unknown output {out.name!r}; model {info.name!r} produces {OUTPUT_NAME!r}"
            )
    tensor = decoded.inputs[0]
    array = tensor.array
    if tensor.datatype != "FP32":
        raise InvalidInput(f"input {INPUT_NAME!r} must be FP32, got {tensor.datatype}")
    channels = info.in_channels
    if array.ndim == 2 and channels == 1:
        array = array.reshape(array.shape[0], array.shape[1], 1)
    if array.ndim != 3 or array.shape[2] != channels:
        allowed = f"[batch, T, {channels}]" + (" or [batch, T]" if channels == 1 else "")
        raise InvalidInput(
            f"input {INPUT_NAME!r} must have shape {allowed}, got {list(tensor.array.shape)}"
        )
    rows, length = array.shape[0], array.shape[1]
    if rows < 1 or length < 1:
        raise InvalidInput(f"input {INPUT_NAME!r} is empty: shape {list(tensor.array.shape)}")
    if rows > max_rows:
        raise InvalidInput(
            f"input {INPUT_NAME!r} has batch size {rows}; the limit per request is {max_rows}"
        )
    if length > info.max_length:
        raise InvalidInput(
            f"input {INPUT_NAME!r} has sequence length {length}; model {info.name!r} accepts "
            f"at most {info.max_length}"
        )
    # Any NaN or Inf makes the float64 sum non-finite: one pass, no temporary mask.
    if not allow_non_finite and not math.isfinite(float(np.sum(array, dtype=np.float64))):
        raise InvalidInput(f"input {INPUT_NAME!r} contains NaN or infinite values")
    result: FloatArray = array
    return result


def _request_options(
    state: ServiceState, runtime: ModelRuntime, params: dict[str, ParameterValue]
) -> tuple[GateConfig, float]:
    """Gate configuration and queue timeout of one request (V2 ``parameters``).

    No gate parameter: the model's runtime configuration. ``gate_mode`` equal to the runtime
    mode keeps the runtime knobs; another mode starts from the model's defaults for that mode.
    ``keep_ratio`` or ``threshold`` then replace the keep policy. ``timeout`` is in microseconds,
    as Triton and its clients define it.
    """
    timeout_s = state.settings.request_timeout_s
    raw_timeout = params.get("timeout")
    if raw_timeout is not None:
        if isinstance(raw_timeout, bool) or not isinstance(raw_timeout, (int, float)) or not (
            raw_timeout > 0
        ):
            raise InvalidInput(
                "parameter 'timeout' must be a positive number of microseconds, "
                f"got {raw_timeout!r}"
            )
        timeout_s = min(float(raw_timeout) / 1e6, 3600.0)
    if not any(p in params for p in GATE_PARAMETERS):
        return runtime.gate, timeout_s

    # The engine validates every knob against models.GateSettings, the one place the bounds
    # live: its errors name the parameter, the value and the allowed range.
    base = runtime.gate
    mode = params.get("gate_mode", base.mode)
    if mode != base.mode:
        base = GateConfig(str(mode))
    keep_ratio = params.get("keep_ratio")
    threshold = params.get("threshold")
    weight = params.get("dynamic_weight")
    if keep_ratio is None and threshold is None:
        keep_ratio, threshold = base.keep_ratio, base.threshold
    if weight is None:
        weight = base.dynamic_weight
    engine = state.engine
    assert engine is not None  # check_ready passed
    gate = engine.resolve_gate(runtime.info.name, str(mode), keep_ratio, threshold, weight)
    return gate, timeout_s


async def _run(
    state: ServiceState,
    runtime: ModelRuntime,
    gate: GateConfig,
    array: FloatArray,
    timeout_s: float,
    request_id: str | None,
    request: Request,
) -> ItemResult:
    engine = state.engine
    assert engine is not None  # check_ready passed
    batcher = runtime.batcher
    if batcher is None:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(
            engine.executor, engine.infer, runtime.info.name, gate, [array]
        )
        return results[0]
    ticket = batcher.submit(gate, array, timeout_s, request_id)
    # While queued, watch the connection: a client that gives up should not cost a forward.
    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(lambda task: None if task.cancelled() else ticket.abandon())
    try:
        return await ticket.future
    except asyncio.CancelledError:
        ticket.abandon()  # the server gave up on this request (forced shutdown): skip compute
        raise
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _response(
    info: ModelInfo,
    decoded: DecodedRequest,
    gate: GateConfig,
    result: ItemResult,
    allow_non_finite: bool = False,
) -> Response:
    parameters: dict[str, ParameterValue] = {"gate_mode": gate.mode}
    if gate.keep_ratio is not None:
        parameters["keep_ratio"] = gate.keep_ratio
    elif gate.threshold is not None:
        parameters["threshold"] = gate.threshold
    else:
        parameters["keep_ratio"] = 1.0  # no keep policy: every open channel runs
    if gate.dynamic_weight is not None:
        parameters["dynamic_weight"] = gate.dynamic_weight
    if not allow_non_finite and not np.isfinite(result.logits).all():
        # Finite but huge inputs can overflow float32 inside the network; JSON would carry the
        # result as nulls. The client has to scale its input.
        raise InvalidInput("input values too large: the model's outputs are not finite")
    parameters["active_channel_ratio"] = result.active_channel_ratio
    parameters["flops_ratio"] = result.flops_ratio
    binary = decoded.binary_output_names((OUTPUT_NAME,))
    body, header_length = encode_response(
        model_name=info.name,
        model_version=info.version,
        request_id=decoded.id,
        outputs=[Tensor(OUTPUT_NAME, result.logits)],
        parameters=parameters,
        binary=binary,
    )
    if header_length is None:
        return Response(body, media_type=JSON)
    return Response(
        body, media_type=OCTET_STREAM, headers={HEADER_LENGTH: str(header_length)}
    )
