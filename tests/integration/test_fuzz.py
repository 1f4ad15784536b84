"""schemathesis against the service's OpenAPI schema, on a real server, bounded.

The app serves no ``/openapi.json`` (it is an inference server, not a documented public API), so
the schema comes from the app factory itself. Every operation gets a few generated requests
(inference more: it is the endpoint that matters, fuzzed through its declared request schema,
against the real model); none may answer 5xx, and every documented response must match its
schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.app import create_app
from service.settings import Settings
from tests.integration.conftest import Server
from tests.utils.service import ADMIN_TOKEN


def _operations() -> list[Any]:
    app = create_app(Settings(model_repository=Path(__file__).resolve().parent, grpc_port=0))
    schema = schemathesis.openapi.from_dict(app.openapi())
    return [result.ok() for result in schema.get_all_operations()]


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield s


def test_no_server_error_and_responses_match_the_schema(
    server: Server, session: requests.Session
) -> None:
    operations = _operations()
    assert len(operations) >= 5
    infer = [op for op in operations if op.path.endswith("/infer")]
    assert len(infer) == 2 and all(op.body for op in infer)  # the schema declares the body

    for operation in operations:
        examples = 60 if operation in infer else 15

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples, deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            # Inference on the served model and version, so generated bodies reach its
            # validation (other operations keep their generated names: no random unload).
            if case.operation.path.endswith("/infer") and case.path_parameters:
                case.path_parameters["model_name"] = "tiny"
                if "model_version" in case.path_parameters:
                    case.path_parameters["model_version"] = "1"
            case.call_and_validate(
                base_url=server.url, session=session, timeout=10,
                checks=[not_a_server_error, response_schema_conformance],
            )

        run()
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5.0).status_code == 200
