"""Real servers for the integration tests: ``gated serve`` in a subprocess on 127.0.0.1.

Each server gets a free port, is polled until ready, and is stopped by the test through its PID
(SIGTERM, then SIGKILL if it hangs). Its log is printed when a test using it fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.local import LocalServer, free_port  # noqa: F401  (re-exported to the tests)
from service.local import start_server as start_local
from tests.utils.service import ADMIN_TOKEN, make_repository

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0

Server = LocalServer
_SERVERS = itertools.count()


def start_server(
    repository: Path | None, log_dir: Path, wait_ready: bool = True, **settings: object
) -> Server:
    """Start ``gated serve`` with ``settings`` as GATED_* variables; wait until it is ready."""
    return start_local(
        repository,
        log_dir / f"server-{next(_SERVERS)}.log",
        settings,
        cwd=ROOT,
        ready_timeout_s=START_TIMEOUT_S if wait_ready else None,
    )


@contextmanager
def serving(repository: Path | None, log_dir: Path, **settings: object) -> Iterator[Server]:
    """A ready server for the life of a fixture; stopping it must exit cleanly (code 0). A
    failing body still stops it (and its own error is the one reported)."""
    srv = start_server(repository, log_dir, **settings)
    try:
        yield srv
    except BaseException:
        srv.stop()
        raise
    assert srv.stop() == 0, srv.output()


def wait_until_ready(server: Server) -> None:
    server.wait_ready(START_TIMEOUT_S)


@pytest.fixture(scope="session")
def integration_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("int-repository"), ("tiny",))


@pytest.fixture(scope="module")
def server(
    integration_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Batched server with an admin token; a 20 ms delay so concurrent requests share batches."""
    with serving(
        integration_repository, tmp_path_factory.mktemp("logs"),
        admin_token=ADMIN_TOKEN, max_batch_size=8, max_queue_delay_ms=20,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server(
    integration_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """No admin token, no batching: the naive one-forward-per-request mode."""
    with serving(integration_repository, tmp_path_factory.mktemp("logs"), batching="false") as srv:
        yield srv
