"""Admin API: read and switch a model's runtime gate configuration.

``PUT /admin/models/{m}/gate`` replaces the configuration that requests without gate parameters
run under. Requests already queued keep the configuration they were admitted with and batches
never mix configurations, so a switch is atomic per batch: in-flight work finishes as it started
and nothing is dropped. Every call needs ``Authorization: Bearer <GATED_ADMIN_TOKEN>``.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, ValidationError

from models.gate_config import RANGES, DynamicWeight, GateMode, KeepRatio, Threshold
from service.dataplane import DataPlane
from service.engine import GateConfig
from service.errors import InvalidInput
from service.protocol.types import ErrorResponse
from service.rest.v2 import plane_of, read_body, read_optional_json


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


# The OpenAPI document declares the scheme; the data plane checks the token (the same check as
# gRPC metadata), from the raw header so that its messages can say what exactly is wrong.
_bearer = HTTPBearer(auto_error=False, description="GATED_ADMIN_TOKEN")


def admin(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> DataPlane:
    """Security dependency of every admin route: the data plane, once the token checks out."""
    plane = plane_of(request)
    plane.authorize(request.headers.get("authorization"))
    return plane


Admin = Annotated[DataPlane, Depends(admin)]
_DENIED: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (401, "no Bearer token"), (403, "wrong token, or the admin API is disabled"),
        (404, "unknown model"), (503, "loading or draining; retry after Retry-After seconds"),
    )
}


def build_router() -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"], responses=_DENIED)
    router.add_api_route("/models/{model_name}/gate", get_gate, methods=["GET"])
    router.add_api_route(
        "/models/{model_name}/gate", put_gate, methods=["PUT"],
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/GateUpdate"}}}}},
        responses={400: {"model": ErrorResponse, "description": "invalid gate update"}},
    )
    return router


def build_repository_router() -> APIRouter:
    """Model repository extension, load and unload: admin calls, same token as ``/admin``."""
    router = APIRouter(prefix="/v2/repository", tags=["admin"], responses=_DENIED)
    router.add_api_route("/models/{model_name}/load", load_model, methods=["POST"])
    router.add_api_route("/models/{model_name}/unload", unload_model, methods=["POST"])
    return router


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


async def get_gate(plane: Admin, model_name: str) -> Response:
    """The configuration requests without gate parameters currently run under."""
    return _gate_body(model_name, plane.gate(model_name))


async def put_gate(request: Request, plane: Admin, model_name: str) -> Response:
    """Switch the runtime gate configuration; answers the new and the previous one."""
    plane.state.model(model_name)
    plane.check_ready()
    try:
        update = GateUpdate.model_validate_json(
            await read_body(request, plane.state.settings.max_request_bytes)
        )
    except ValidationError as err:
        raise InvalidInput(_describe(err)) from None
    gate, previous = plane.set_gate(
        model_name, update.mode, update.keep_ratio, update.threshold, update.dynamic_weight
    )
    return _gate_body(
        model_name,
        gate,
        previous={"mode": previous.mode, "keep_ratio": previous.keep_ratio,
                  "threshold": previous.threshold, "dynamic_weight": previous.dynamic_weight},
    )


def _describe(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    fields = ", ".join(f"{name} in {RANGES[name]}" for name in GateUpdate.model_fields)
    return "invalid gate update: " + "; ".join(parts) + f" (fields: {fields})"


class LoadRequest(BaseModel):
    """Body of ``POST /v2/repository/models/{m}/load`` (optional): ``{"parameters": {...}}``."""

    parameters: dict[str, Any] = {}


async def load_model(request: Request, plane: Admin, model_name: str) -> Response:
    """Load ``model_name``'s checkpoint from the repository again and swap it in under load.

    Requests already queued or computing finish on the weights they started with; the previous
    weights are released once the last batch using them is done. Loads an unloaded model too.
    """
    query = await read_optional_json(
        request, plane, LoadRequest, 'repository load body must be {} or {"parameters": {...}}'
    )
    info = await plane.load(model_name, list(query.parameters))
    return Response(
        orjson.dumps({"name": model_name, "version": info.version, "state": "READY"}),
        media_type="application/json",
    )


async def unload_model(plane: Admin, model_name: str) -> Response:
    """Stop serving ``model_name`` (then 404); queued requests are still answered first."""
    await plane.unload(model_name)
    return Response(
        orjson.dumps({"name": model_name, "state": "UNAVAILABLE"}), media_type="application/json"
    )
