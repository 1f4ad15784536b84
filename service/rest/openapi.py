"""The OpenAPI document of the REST front end.

FastAPI derives it from the routes; the bodies that handlers read themselves (inference, for
speed; the gate update, for its error messages) are declared by reference, and their pydantic
schemas are added to the document's components here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.protocol.types import InferenceRequest
from service.rest.admin import GateUpdate

_BODIES: tuple[type[BaseModel], ...] = (InferenceRequest, GateUpdate)


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the document with the declared request bodies."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, routes=app.routes,
                description="Open Inference Protocol (V2) with gate parameters",
            )
            _, bodies = models_json_schema(
                [(model, "validation") for model in _BODIES],
                ref_template="#/components/schemas/{model}",
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in bodies.get("$defs", {}).items():
                schemas.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
