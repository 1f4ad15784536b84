"""Process lifecycle on a real server: SIGTERM drains (REST and gRPC), deadlines, full queues and
cancelled calls, and the shipped checkpoint serves."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2

from tests.integration.conftest import ROOT, Server, start_server
from tests.utils.clients import GrpcClient, grpc_reply, grpc_request
from tests.utils.service import json_request, metric, reference_logits, tiny_network

SHIPPED = ROOT / "models" / "pretrained" / "mnist1d-conv"


def _queued(url: str) -> float:
    return metric(url, "gated_queue_depth", model="tiny")


def _inflight(url: str) -> float:
    return metric(url, "gated_inflight_requests", model="tiny")


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


DRAIN_REQUESTS = 100
DRAIN_TIMEOUT_S = 20


def test_sigterm_drains_in_flight_then_exits_zero(
    integration_repository: Path, tmp_path: Path
) -> None:
    """SIGTERM with 100 requests queued, one upload that finishes during the drain and one
    that stalls for ever: readiness and new requests get 503 at once, every accepted request
    gets its 200 with its own logits, the uploads (never accepted: not in flight) get 503 with
    Retry-After, and the process exits 0 well within the drain timeout, the stall
    notwithstanding."""
    # Batch limits (requests and rows) above the load and a long queue delay keep all 100 queued
    # while the signal arrives.
    server = start_server(
        integration_repository,
        tmp_path,
        max_batch_size=DRAIN_REQUESTS + 28,
        max_batch_rows=DRAIN_REQUESTS + 28,
        max_queue_delay_ms=10_000,
        drain_timeout_s=DRAIN_TIMEOUT_S,
    )
    try:
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((1, 40)).astype(np.float32) for _ in range(DRAIN_REQUESTS)]
        bodies = [orjson.dumps(json_request(x)) for x in xs]
        slow_body = bodies[0]
        uploads = []
        for _ in range(2):  # the slow one, then the stalled one
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(
                b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: test\r\n"
                + f"Content-Length: {len(slow_body)}\r\n\r\n".encode() + slow_body[:10]
            )
            uploads.append(sock)
        slow, stalled = uploads

        def call(body: bytes) -> tuple[int, list[float]]:
            reply = httpx.post(f"{server.url}/v2/models/tiny/infer", content=body, timeout=30)
            data = reply.json()["outputs"][0]["data"] if reply.status_code == 200 else []
            return reply.status_code, data

        with ThreadPoolExecutor(DRAIN_REQUESTS) as pool:
            futures = [pool.submit(call, body) for body in bodies]
            _wait_for(lambda: _queued(server.url) == DRAIN_REQUESTS, timeout_s=20)
            # Uploads still arriving are not accepted requests yet.
            assert _inflight(server.url) == DRAIN_REQUESTS
            os.kill(server.process.pid, signal.SIGTERM)
            signalled = time.monotonic()
            ready = httpx.get(f"{server.url}/v2/health/ready")
            assert ready.status_code == 503 and "shutting down" in ready.json()["error"]
            assert ready.headers["retry-after"]
            late = httpx.post(f"{server.url}/v2/models/tiny/infer", content=bodies[1])
            assert late.status_code == 503 and late.headers["retry-after"]
            slow.sendall(slow_body[10:])
            answer = _read_response(slow)
            assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
            assert b"retry-after" in answer.lower() and b"shutting down" in answer
            results = [f.result(timeout=30) for f in futures]
        assert [status for status, _ in results] == [200] * DRAIN_REQUESTS
        # Each request got its own answer, computed in full.
        expected = reference_logits(tiny_network(seed=0), np.concatenate(xs))
        got = np.array([data for _, data in results], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        # The stalled upload is refused when the drain is over, not waited for.
        answer = _read_response(stalled)
        assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer, answer[:200]
        assert server.process.wait(DRAIN_TIMEOUT_S) == 0, server.output()
        # The drain took what the work needs, not the timeout.
        assert time.monotonic() - signalled < DRAIN_TIMEOUT_S / 2
        assert "Traceback" not in server.output()
        # After exit the port is closed: a new connection is refused.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/v2/health/live", timeout=2)
        for sock in uploads:
            sock.close()
    finally:
        server.stop()


def test_shipped_checkpoint_serves_by_default(tmp_path: Path) -> None:
    from models import load_checkpoint

    server = start_server(None, tmp_path)
    try:
        x = np.random.default_rng(0).standard_normal((4, 40)).astype(np.float32)
        client = triton.InferenceServerClient(server.address)
        inp = triton.InferInput("input", [4, 40], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("mnist1d-conv", [inp])
        client.close()
        net = load_checkpoint(SHIPPED)
        np.testing.assert_allclose(
            result.as_numpy("logits"), reference_logits(net, x, "dynamic"), atol=1e-5
        )
        assert server.stop() == 0
    finally:
        server.stop()


def test_queue_timeout_full_queue_and_disconnect(
    integration_repository: Path, tmp_path: Path
) -> None:
    """504 for a request whose V2 timeout passes in the queue, 503 + Retry-After when the queue
    is full, and a client that disconnects while queued is dropped before compute."""
    server = start_server(
        integration_repository, tmp_path, max_batch_size=64, max_queue_delay_ms=1500,
        max_queue_size=2,
    )
    try:
        x = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
        body = orjson.dumps(json_request(x))
        head = (
            f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: test\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        # A half-sent request keeps the batcher waiting for it (a batch mate on its way), so
        # the queue holds; it is not in flight (not accepted) while its body is incomplete.
        holder = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        holder.sendall(head + body[:10])
        time.sleep(0.3)
        assert _inflight(server.url) == 0

        timed = httpx.post(
            f"{server.url}/v2/models/tiny/infer",
            json=json_request(x, timeout=200_000), timeout=30,
        )
        assert timed.status_code == 504 and "timed out" in timed.json()["error"]

        leaver = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        leaver.sendall(head + body)
        _wait_for(lambda: _queued(server.url) == 1)
        leaver.close()
        rejected = "gated_rejected_requests_total"
        _wait_for(lambda: metric(server.url, rejected, reason="client_disconnected") == 1)
        assert _queued(server.url) == 0

        def call() -> int:
            return httpx.post(
                f"{server.url}/v2/models/tiny/infer", content=body, timeout=30
            ).status_code

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(call) for _ in range(2)]
            _wait_for(lambda: _queued(server.url) == 2)
            full = httpx.post(f"{server.url}/v2/models/tiny/infer", content=body)
            assert full.status_code == 503 and "full" in full.json()["error"]
            assert full.headers["retry-after"] == "1"
            holder.sendall(body[10:])  # admitted long ago, but the queue is full now
            assert holder.recv(65536).startswith(b"HTTP/1.1 503")
            assert [f.result(timeout=30) for f in futures] == [200, 200]
        holder.close()
        computed = metric(server.url, "gated_batch_size_sum", model="tiny")
        assert computed == 2  # the two callers; never the timed-out request or the leaver
        assert metric(server.url, rejected, reason="timeout") == 1
        assert metric(server.url, rejected, reason="queue_full") == 2
        assert server.stop() == 0
    finally:
        server.stop()


def _holder(server: Server, body: bytes) -> socket.socket:
    """A REST request whose body is half sent: on its way (not in flight), so the batcher
    waits for mates."""
    holder = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    holder.sendall(
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: test\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10]
    )
    time.sleep(0.3)
    assert _inflight(server.url) == 0
    return holder


def test_grpc_deadline_cancel_and_full_queue(integration_repository: Path, tmp_path: Path) -> None:
    """The REST outcomes of the test above, over gRPC: DEADLINE_EXCEEDED for the ``timeout``
    parameter and for the client's own deadline, UNAVAILABLE + retry-after for a full queue, and
    a call cancelled while queued is dropped before compute."""
    server = start_server(
        integration_repository, tmp_path, max_batch_size=64, max_queue_delay_ms=1500,
        max_queue_size=2,
    )
    caller = GrpcClient(server.grpc_address)
    try:
        x = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
        body = orjson.dumps(json_request(x))
        holder = _holder(server, body)
        rejected = "gated_rejected_requests_total"

        timed = caller.infer(x, timeout=200_000)
        assert timed.outcome == "deadline" and "timed out" in timed.message, timed
        # The client's deadline bounds the queue wait too: the call fails in time and the
        # server drops the request (it never computes).
        start = time.monotonic()
        late = caller.send(grpc_request(x), timeout_s=0.3)
        assert late.outcome == "deadline" and time.monotonic() - start < 1.2, late
        _wait_for(lambda: _queued(server.url) == 0)

        stub = caller.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        leaver = stub.future(grpc_request(x), timeout=30)
        _wait_for(lambda: _queued(server.url) == 1)
        before = metric(server.url, rejected, reason="client_disconnected")
        assert leaver.cancel()
        _wait_for(lambda: metric(server.url, rejected, reason="client_disconnected") == before + 1)
        assert _queued(server.url) == 0

        waiting = [stub.future(grpc_request(x), timeout=30) for _ in range(2)]
        _wait_for(lambda: _queued(server.url) == 2)
        full = caller.infer(x)
        assert full.outcome == "unavailable" and "full" in full.message, full
        assert full.retry_after == "1"
        holder.sendall(body[10:])
        assert holder.recv(65536).startswith(b"HTTP/1.1 503")
        replies = [grpc_reply(f.result(timeout=30)) for f in waiting]
        assert [r.outcome for r in replies] == ["ok", "ok"]
        holder.close()
        computed = metric(server.url, "gated_batch_size_sum", model="tiny")
        assert computed == 2  # the two callers; never the timed-out, late or cancelled ones
        assert metric(server.url, rejected, reason="timeout") == 2
        grpc_requests = metric(server.url, "gated_requests_total", protocol="grpc")
        assert grpc_requests == 6
        caller.close()
        assert server.stop() == 0
    finally:
        caller.close()
        server.stop()


GRPC_DRAIN_REQUESTS = 40


def test_sigterm_drains_grpc_requests_too(integration_repository: Path, tmp_path: Path) -> None:
    """SIGTERM with gRPC calls queued: the health service turns NOT_SERVING and ServerReady
    false at once, a new call gets UNAVAILABLE, every queued call gets its own logits, exit 0."""
    server = start_server(
        integration_repository, tmp_path, max_batch_size=64, max_batch_rows=64,
        max_queue_delay_ms=10_000, drain_timeout_s=DRAIN_TIMEOUT_S,
    )
    caller = GrpcClient(server.grpc_address)
    try:
        health = health_pb2_grpc.HealthStub(caller.channel)
        serving = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert serving.status == health_pb2.HealthCheckResponse.SERVING
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal((1, 40)).astype(np.float32) for _ in range(GRPC_DRAIN_REQUESTS)]
        holder = _holder(server, orjson.dumps(json_request(xs[0])))
        stub = caller.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        futures = [stub.future(grpc_request(x), timeout=30) for x in xs]
        _wait_for(lambda: _queued(server.url) == GRPC_DRAIN_REQUESTS, timeout_s=20)
        os.kill(server.process.pid, signal.SIGTERM)
        _wait_for(lambda: not caller.ready())
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        late = caller.infer(xs[0])
        assert late.outcome == "unavailable" and late.retry_after == "1", late
        holder.close()  # the half-sent REST request gives up: the batch goes
        replies = [grpc_reply(f.result(timeout=30)) for f in futures]
        expected = reference_logits(tiny_network(seed=0), np.concatenate(xs))
        np.testing.assert_allclose(
            np.concatenate([r.logits for r in replies]), expected, atol=1e-5
        )
        caller.close()
        assert server.process.wait(DRAIN_TIMEOUT_S) == 0, server.output()
    finally:
        caller.close()
        server.stop()


def test_a_grpc_port_in_use_stops_startup_with_one_line(
    integration_repository: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(integration_repository, tmp_path, wait_ready=False, grpc_port=port)
        try:
            assert server.process.wait(60) == 2
        finally:
            server.stop()
    output = server.output()
    assert f"GATED_GRPC_PORT): 127.0.0.1:{port} is in use" in output
    assert "Traceback" not in output
