"""Fixtures of the in-process service tests: a tiny model repository and app clients."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

with warnings.catch_warnings():
    # Starlette nudges towards httpx2 at import; the test client itself works unchanged.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from tests.utils.service import ADMIN_TOKEN, make_repository

ClientFactory = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repository"), ("tiny", "tiny2"))


@pytest.fixture
def service_client(tiny_repository: Path, monkeypatch: pytest.MonkeyPatch) -> ClientFactory:
    """``with service_client(**settings) as client``: a fresh app (own metrics registry) whose
    lifespan runs, so models are loaded, warmed up and drained as in production."""
    from service.app import create_app
    from service.settings import ENV_PREFIX, load_settings

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)

    @contextmanager
    def factory(**overrides: object) -> Iterator[TestClient]:
        values: dict[str, object] = {
            "model_repository": tiny_repository,
            "admin_token": ADMIN_TOKEN,
            "max_batch_size": 4,
            "max_queue_delay_ms": 1.0,
            "grpc_port": 0,  # REST only, in-process; gRPC is tested against real servers
            **overrides,
        }
        settings = load_settings(**values)
        with TestClient(create_app(settings)) as client:
            yield client

    return factory
