"""Admin API: read and switch a model's runtime gate configuration.

``PUT /admin/models/{m}/gate`` replaces the configuration that requests without gate parameters
run under. Requests already queued keep the configuration they were admitted with and batches
never mix configurations, so a switch is atomic per batch: in-flight work finishes as it started
and nothing is dropped. Every call needs ``Authorization: Bearer <GATED_ADMIN_TOKEN>``.
"""

from __future__ import annotations

import hmac
import logging

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from models.gate_config import RANGES, DynamicWeight, GateMode, KeepRatio, Threshold
from service.engine import GateConfig
from service.errors import AdminDisabled, Forbidden, InvalidInput, Unauthorized
from service.routes.v2 import read_body
from service.state import ServiceState

logger = logging.getLogger(__name__)


class GateUpdate(BaseModel):
    """Body of ``PUT /admin/models/{m}/gate``; omitted knobs take the model's defaults.

    ```
    {"mode": "dense"|"static"|"dynamic", "keep_ratio": number | null,
     "threshold": number | null, "dynamic_weight": number | null}
    ```

    The ranges are ``models.gate_config``'s (``RANGES``), quoted in every error.
    """

    # Strict numbers, as the inference path: "0.5" and true are not keep ratios. The bounds
    # are models.gate_config's, the one place they are declared.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: GateMode
    keep_ratio: KeepRatio | None = None
    threshold: Threshold | None = None
    dynamic_weight: DynamicWeight | None = None


def build_router() -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"])
    router.add_api_route("/models/{model_name}/gate", get_gate, methods=["GET"])
    router.add_api_route("/models/{model_name}/gate", put_gate, methods=["PUT"])
    return router


def build_repository_router() -> APIRouter:
    """Model repository extension, load and unload: admin calls, same token as ``/admin``."""
    router = APIRouter(prefix="/v2/repository", tags=["admin"])
    router.add_api_route("/models/{model_name}/load", load_model, methods=["POST"])
    router.add_api_route("/models/{model_name}/unload", unload_model, methods=["POST"])
    return router


def _authorize(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    token = state.settings.admin_token
    if token is None:
        raise AdminDisabled("admin API is disabled: set GATED_ADMIN_TOKEN to enable it")
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    # Constant time: response timing must not reveal how much of a guess was right.
    if not hmac.compare_digest(
        presented.strip().encode(), token.get_secret_value().encode()
    ):
        raise Forbidden("invalid admin token")
    return state


def _gate_body(model: str, gate: GateConfig, **extra: object) -> Response:
    body = {
        "model": model,
        "mode": gate.mode,
        "keep_ratio": gate.keep_ratio,
        "threshold": gate.threshold,
        "dynamic_weight": gate.dynamic_weight,
        **extra,
    }
    return Response(orjson.dumps(body), media_type="application/json")


async def get_gate(request: Request, model_name: str) -> Response:
    """The configuration requests without gate parameters currently run under."""
    state = _authorize(request)
    runtime = state.model(model_name)
    return _gate_body(model_name, runtime.gate)


async def put_gate(request: Request, model_name: str) -> Response:
    """Switch the runtime gate configuration; answers the new and the previous one."""
    state = _authorize(request)
    runtime = state.model(model_name)
    state.check_ready()
    try:
        update = GateUpdate.model_validate_json(
            await read_body(request, state.settings.max_request_bytes)
        )
    except ValidationError as err:
        raise InvalidInput(_describe(err)) from None
    engine = state.engine
    assert engine is not None  # check_ready passed
    gate = engine.resolve_gate(
        model_name, update.mode, update.keep_ratio, update.threshold, update.dynamic_weight
    )
    previous, runtime.gate = runtime.gate, gate
    if state.metrics is not None:
        state.metrics.gate_switches.labels(model_name, gate.mode).inc()
        state.metrics.set_gate(model_name, gate.mode, gate.keep_ratio)
    logger.info(
        "model %s: gate switched from %s to %s", model_name, _show(previous), _show(gate)
    )
    return _gate_body(
        model_name,
        gate,
        previous={"mode": previous.mode, "keep_ratio": previous.keep_ratio,
                  "threshold": previous.threshold, "dynamic_weight": previous.dynamic_weight},
    )


def _show(gate: GateConfig) -> str:
    return (
        f"{gate.mode}(keep_ratio={gate.keep_ratio}, threshold={gate.threshold}, "
        f"dynamic_weight={gate.dynamic_weight})"
    )


def _describe(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    fields = ", ".join(f"{name} in {RANGES[name]}" for name in GateUpdate.model_fields)
    return "invalid gate update: " + "; ".join(parts) + f" (fields: {fields})"


async def load_model(request: Request, model_name: str) -> Response:
    """Load ``model_name``'s checkpoint from the repository again and swap it in under load.

    Requests already queued or computing finish on the weights they started with; the previous
    weights are released once the last batch using them is done. Loads an unloaded model too.
    """
    state = _authorize(request)
    state.check_ready()
    async with state.repository_lock:
        runtime = await state.reload(model_name)
    logger.info("model %s: loaded from the repository", model_name)
    return Response(
        orjson.dumps({"name": model_name, "version": runtime.info.version, "state": "READY"}),
        media_type="application/json",
    )


async def unload_model(request: Request, model_name: str) -> Response:
    """Stop serving ``model_name`` (then 404); queued requests are still answered first."""
    state = _authorize(request)
    state.check_ready()
    async with state.repository_lock:
        await state.unload(model_name)
    logger.info("model %s: unloaded", model_name)
    return Response(
        orjson.dumps({"name": model_name, "state": "UNAVAILABLE"}), media_type="application/json"
    )
