"""Cheap requests that used to cost the server dearly, against real servers on 127.0.0.1: gate
parameters cycled to make it compile, adversarial JSON bodies, stalled connections and huge
headers. Each test is bounded in requests and seconds."""

from __future__ import annotations

import contextlib
import random
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import numpy as np
import orjson
import pytest

from tests.integration.conftest import Server, serving
from tests.utils.service import json_request, metric

T = TypeVar("T")
X = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shipped model (its real plan compile costs), short read timeouts."""
    with serving(
        None, tmp_path_factory.mktemp("logs"), header_timeout_s=1.0, body_timeout_s=1.0,
        max_queue_size=4096,
    ) as srv:
        yield srv


MODEL = "mnist1d-conv"


# ---------------------------------------------------------------------- compile amplification


def _median_latency_under(server: Server, hostile: Callable[[int], dict[str, object]]) -> float:
    """Median latency (s) of a plain client while two others send 200 requests each, as fast
    as they can, with the parameters ``hostile(i)`` gives."""
    url = f"{server.url}/v2/models/{MODEL}/infer"
    done = threading.Event()
    statuses: list[int] = []

    def attacker(seed: int) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(200):
                body = orjson.dumps(json_request(X, **hostile(seed * 1000 + i)))
                statuses.append(client.post(url, content=body).status_code)

    threads = [threading.Thread(target=attacker, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    latencies: list[float] = []
    body = orjson.dumps(json_request(X))
    with httpx.Client(timeout=30) as client:
        while any(t.is_alive() for t in threads) and len(latencies) < 400:
            start = time.perf_counter()
            assert client.post(url, content=body).status_code == 200
            latencies.append(time.perf_counter() - start)
    done.set()
    for t in threads:
        t.join(30)
    assert len(statuses) == 400 and set(statuses) <= {200, 400}, set(statuses)
    return statistics.median(latencies)


def test_cycling_gate_parameters_costs_an_ordinary_client_little(shipped: Server) -> None:
    """Two clients cycle keep ratios, blend weights and thresholds; a third client's median
    latency stays within 2x of what it is when the two send the same kinds of request with
    fixed values (no request makes the server compile a plan, and a blend weight or threshold
    is a value of a plan: requests of one plan share batches whatever their values)."""
    rng = random.Random(0)

    def requests(cycle: bool) -> Callable[[int], dict[str, object]]:
        def make(i: int) -> dict[str, object]:
            kind = i % 3
            if kind == 0:  # keep ratios outside the served set: refused, never compiled
                return {"keep_ratio": round(rng.uniform(0.01, 0.99), 6) if cycle else 0.3}
            if kind == 1:  # a new blend weight every request: a value of one compiled plan
                return {"keep_ratio": 0.5,
                        "dynamic_weight": round(rng.uniform(0, 1), 6) if cycle else 0.3}
            return {"threshold": round(rng.uniform(0, 1), 6) if cycle else 0.5}

        return make

    fixed = _median_latency_under(shipped, requests(cycle=False))
    cycled = _median_latency_under(shipped, requests(cycle=True))
    assert cycled <= 2 * fixed, f"median {cycled * 1e3:.2f} ms cycling vs {fixed * 1e3:.2f} fixed"
    # Refused keep ratios name what is served.
    reply = httpx.post(f"{shipped.url}/v2/models/{MODEL}/infer",
                       json=json_request(X, keep_ratio=0.3))
    assert reply.status_code == 400
    assert "keep_ratio in {0.25, 0.5, 0.75, 1}" in reply.json()["error"]


# ---------------------------------------------------------------------- parser amplification

SIXTEEN_MIB = 16 * 1024 * 1024


def _adversarial_json() -> bytes:
    """16 MiB of a valid-looking request whose data is millions of tiny nested values."""
    head = b'{"inputs":[{"name":"input","shape":[1,40],"datatype":"FP32","data":['
    tail = b"]}]}"
    unit = b"[0],"
    count = (SIXTEEN_MIB - len(head) - len(tail) - 3) // len(unit)
    return head + unit * count + b"[0]" + tail


def _liveness_while(action: Callable[[], T], url: str) -> tuple[T, float]:
    """Run ``action`` while polling liveness; returns its response and the slowest probe."""
    worst = 0.0
    stop = threading.Event()

    def probe() -> None:
        nonlocal worst
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                start = time.perf_counter()
                assert client.get(f"{url}/v2/health/live").status_code == 200
                worst = max(worst, time.perf_counter() - start)
                time.sleep(0.005)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        return action(), worst
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_16_mib_adversarial_json_body_is_refused_at_once(shipped: Server, framing: str) -> None:
    """Refused within 100 ms of the request's start, liveness answering meanwhile. With
    Content-Length the answer comes at the headers, chunked once the bytes read pass the limit,
    both while the client is still sending: timed to the status line, not to the end of the
    16 MiB upload (which a loaded machine can stretch past 100 ms)."""
    body = _adversarial_json()
    assert len(body) <= SIXTEEN_MIB
    path = f"/v2/models/{MODEL}/infer"

    def exchange(request: bytes) -> bytes:
        sock = _connect(shipped)
        sender = threading.Thread(target=_send_quietly, args=(sock, request))
        start = time.perf_counter()
        sender.start()
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        elapsed.append(time.perf_counter() - start)
        head, _, rest = answer.partition(b"\r\n\r\n")
        size = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")))
        while len(rest) < size and (chunk := sock.recv(65536)):  # the rest of the answer
            rest += chunk
        sock.close()
        sender.join(30)
        return head + b"\r\n\r\n" + rest

    def declared() -> bytes:
        head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
        return exchange(head.encode() + body)

    def chunked() -> bytes:  # no Content-Length: the server finds out while reading
        head = f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        return exchange(head.encode() + framed)

    elapsed: list[float] = []
    answer, worst_probe = _liveness_while(declared if framing == "content-length" else chunked,
                                          shipped.url)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"exceeds" in answer, answer[:300]
    assert elapsed[0] < 0.1, elapsed
    assert worst_probe < 0.1, f"liveness took {worst_probe * 1e3:.0f} ms meanwhile"


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    # The server closes after refusing: the rest of a large send may fail, as expected.
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_a_body_of_tiny_values_under_the_byte_limit_is_refused_before_parsing(
    shipped: Server,
) -> None:
    """1 MiB (under the shipped model's 1.06 MiB limit) of 500,000 values where the model takes
    at most 32,768 elements: 413 from three byte counts, no parse."""
    head = b'{"inputs":[{"name":"input","shape":[1,40],"datatype":"FP32","data":['
    body = head + b"0," * 500_000 + b"0]}]}"
    start = time.perf_counter()
    reply = httpx.post(f"{shipped.url}/v2/models/{MODEL}/infer", content=body, timeout=10)
    elapsed = time.perf_counter() - start
    assert reply.status_code == 413 and "values" in reply.json()["error"], reply.text
    assert elapsed < 0.1, elapsed


# ---------------------------------------------------------------------- slow clients, headers


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_stalled_connections_are_closed_by_the_read_timeouts(shipped: Server) -> None:
    """25 connections stall in their headers, 25 in their bodies: none counts as in flight,
    the server keeps answering, and the 1 s read timeouts close every one (408)."""
    body = orjson.dumps(json_request(X))
    socks = []
    for i in range(50):
        sock = _connect(shipped)
        if i % 2:
            sock.sendall(b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: t\r\n" % MODEL.encode())
        else:
            sock.sendall(
                b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                % (MODEL.encode(), len(body)) + body[:20]
            )
        socks.append(sock)
    start = time.monotonic()
    assert metric(shipped.url, "gated_inflight_requests", model=MODEL) == 0
    reply = httpx.post(f"{shipped.url}/v2/models/{MODEL}/infer", content=body, timeout=5)
    assert reply.status_code == 200
    answers = []
    for sock in socks:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        answers.append(data)
        sock.close()
    assert time.monotonic() - start < 5
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    assert sum(b"request body not received within 1 s" in a for a in answers) == 25
    assert sum(b"request headers not received within 1 s" in a for a in answers) == 25
    assert metric(shipped.url, "gated_inflight_requests", model=MODEL) == 0


def test_an_idle_connection_is_closed_after_the_header_timeout(shipped: Server) -> None:
    sock = _connect(shipped)
    start = time.monotonic()
    assert sock.recv(100) == b""  # closed without an answer: it never asked anything
    assert 0.9 < time.monotonic() - start < 3
    sock.close()


@pytest.mark.parametrize("size", [40 * 1024, 48 * 1024 * 1024])
def test_an_oversized_header_is_refused_with_431(shipped: Server, size: int) -> None:
    """Past the 32 KiB default the head is refused before the parser sees the rest; a 48 MiB
    line costs the server 32 KiB of parsing, and the server stays responsive meanwhile."""
    sock = _connect(shipped)
    line = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Big: "
    start = time.perf_counter()

    def send() -> None:
        # The server closes after refusing: the large one's send fails, as expected.
        with contextlib.suppress(OSError):
            sock.sendall(line + b"a" * size + b"\r\n\r\n")

    sender = threading.Thread(target=send)
    sender.start()
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    elapsed = time.perf_counter() - start
    sender.join(30)
    sock.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:80]
    assert b"exceed 32768 bytes" in data
    assert elapsed < 1.0, elapsed
    assert httpx.get(f"{shipped.url}/v2/health/live", timeout=2).status_code == 200


def test_a_normal_header_and_keep_alive_still_work(shipped: Server) -> None:
    """The limits leave ordinary use alone: 20 requests on one kept-alive connection with a
    16 KiB header each."""
    with httpx.Client(timeout=5) as client:
        for _ in range(20):
            reply = client.post(
                f"{shipped.url}/v2/models/{MODEL}/infer", json=json_request(X),
                headers={"x-note": "n" * 16 * 1024},
            )
            assert reply.status_code == 200
