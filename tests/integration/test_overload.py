"""Overload on a real server: a bounded queue sheds load with 503 + Retry-After, never hangs.

300 requests arrive at once at a server whose queue holds 16 and whose batcher waits for batch
mates, so the queue fills. Every answer must be 200 or 503 with ``Retry-After``, each within its
client timeout; the server stays ready, and ``gated_rejected_requests_total{reason="queue_full"}``
counts exactly the 503s the clients saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.integration.conftest import Server, serving
from tests.utils.service import json_request, metric

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


async def _storm(url: str) -> list[httpx.Response]:
    body = orjson.dumps(json_request(np.zeros((1, 32), dtype=np.float32)))
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/v2/models/tiny/infer", content=body) for _ in range(REQUESTS))
        )


def test_overload_sheds_with_503_and_counts_every_rejection(small_queue_server: Server) -> None:
    url = small_queue_server.url
    before = metric(url, "gated_rejected_requests_total", reason="queue_full")
    # A hang would surface as httpx.ReadTimeout out of gather and fail the test.
    responses = asyncio.run(_storm(small_queue_server.url))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    shed = [r for r in responses if r.status_code == 503]
    assert shed, "the queue never filled: the test did not overload the server"
    assert statuses.count(200) >= QUEUE_SIZE
    for response in shed:
        assert response.headers.get("retry-after", "").isdecimal(), response.headers
        assert "queue" in response.json()["error"]
    rejected = metric(url, "gated_rejected_requests_total", reason="queue_full") - before
    assert rejected == len(shed)
    assert httpx.get(f"{small_queue_server.url}/v2/health/ready", timeout=5.0).status_code == 200
    ok = httpx.post(
        f"{small_queue_server.url}/v2/models/tiny/infer",
        content=orjson.dumps(json_request(np.zeros((1, 32), dtype=np.float32))), timeout=5.0,
    )
    assert ok.status_code == 200, ok.text
