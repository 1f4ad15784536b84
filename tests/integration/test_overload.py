"""Overload on a real server: a bounded queue sheds load with 503 + Retry-After, never hangs.

300 requests arrive at once at a server whose queue holds 16 and whose batcher waits for batch
mates, so the queue fills. Every answer must be 200 or 503 with ``Retry-After`` (over gRPC: OK,
or UNAVAILABLE with a ``retry-after`` trailer), each within its client timeout; the server stays
ready, and ``gated_rejected_requests_total{reason="queue_full"}`` counts exactly the rejections
the clients saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import Server, serving
from tests.utils.clients import PROTOCOLS, Reply, async_client, client
from tests.utils.service import metric

REQUESTS = 300
QUEUE_SIZE = 16
CLIENT_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def small_queue_server(
    integration_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(
        integration_repository, tmp_path_factory.mktemp("logs"),
        max_queue_size=QUEUE_SIZE, max_batch_size=4, max_queue_delay_ms=50,
    ) as srv:
        yield srv


async def _storm(protocol: str, server: Server) -> list[Reply]:
    x = np.zeros((1, 32), dtype=np.float32)
    caller = async_client(protocol, server, CLIENT_TIMEOUT_S, connections=REQUESTS)
    try:
        # A hang would surface as a client timeout ("deadline" or an httpx error) and fail.
        return await asyncio.gather(*(caller.infer(x) for _ in range(REQUESTS)))
    finally:
        await caller.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_overload_sheds_with_503_and_counts_every_rejection(
    small_queue_server: Server, protocol: str
) -> None:
    url = small_queue_server.url
    before = metric(url, "gated_rejected_requests_total", reason="queue_full")
    replies = asyncio.run(_storm(protocol, small_queue_server))
    outcomes = [r.outcome for r in replies]
    assert set(outcomes) <= {"ok", "unavailable"}, sorted(set(outcomes))
    shed = [r for r in replies if r.outcome == "unavailable"]
    assert shed, "the queue never filled: the test did not overload the server"
    assert outcomes.count("ok") >= QUEUE_SIZE
    for reply in shed:
        assert (reply.retry_after or "").isdecimal(), reply
        assert "queue" in reply.message
    rejected = metric(url, "gated_rejected_requests_total", reason="queue_full") - before
    assert rejected == len(shed)
    assert httpx.get(f"{url}/v2/health/ready", timeout=5.0).status_code == 200
    caller = client(protocol, small_queue_server, 5.0)
    try:
        assert caller.ready()
        ok = caller.infer(np.zeros((1, 32), dtype=np.float32))
        assert ok.outcome == "ok", ok
    finally:
        caller.close()
