"""Tracing: one request's spans form one trace joined to the caller's ``traceparent``, over REST
and gRPC, and a real server exports them over OTLP/HTTP to a collector.

The first test runs the app in this process (uvicorn in a thread, the gRPC server in its loop)
with the SDK's in-memory exporter; the second starts ``gated serve`` with
``GATED_OTEL_ENDPOINT`` pointing at a local receiver that decodes what it is sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from service.app import create_app
from service.local import free_port
from service.settings import load_settings
from service.tracing import Tracing
from tests.integration.conftest import start_server
from tests.utils.clients import GrpcClient, grpc_request, rest_body, rest_reply

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

X = np.random.default_rng(0).standard_normal((2, 24)).astype(np.float32)


def _traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


class _InProcess:
    """The app with REST and gRPC in a background thread, stopped like SIGTERM would."""

    def __init__(self, repository: Path, tracing: Tracing) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        settings = load_settings(
            model_repository=repository, host="127.0.0.1", port=self.port,
            grpc_port=self.grpc_port, max_batch_size=8, max_queue_delay_ms=20,
        )
        config = uvicorn.Config(
            create_app(settings, tracing=tracing), host="127.0.0.1", port=self.port,
            log_config=None, lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _InProcess:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "app did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def traced(integration_repository: Path) -> Iterator[tuple[_InProcess, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with _InProcess(integration_repository, Tracing(provider)) as app:
        yield app, exporter


def _request_spans(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, ReadableSpan]:
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    return {s.name: s for s in spans}


def _check_trace(
    exporter: InMemorySpanExporter, trace_id: int, parent_id: int, protocol: str
) -> None:
    deadline = time.monotonic() + 5
    while "infer tiny" not in _request_spans(exporter, trace_id):
        assert time.monotonic() < deadline, "no request span"
        time.sleep(0.02)
    spans = _request_spans(exporter, trace_id)
    assert set(spans) == {"infer tiny", "queue", "compute"}
    root = spans["infer tiny"]
    assert root.parent is not None and root.parent.span_id == parent_id  # the caller's span
    assert root.attributes is not None
    assert root.attributes["gated.protocol"] == protocol
    assert root.attributes["gated.gate_mode"] == "dynamic"
    assert 0 < float(root.attributes["gated.flops_ratio"]) <= 1  # type: ignore[arg-type]
    for child in ("queue", "compute"):
        assert spans[child].parent is not None
        assert spans[child].parent.span_id == root.context.span_id
    compute = spans["compute"].attributes
    assert compute is not None and compute["gated.model"] == "tiny"
    assert int(compute["gated.batch_size"]) >= 1  # type: ignore[call-overload]
    assert spans["queue"].end_time <= spans["compute"].start_time  # type: ignore[operator]
    # The shared batch has a span of its own, linked to this request's.
    batches = [
        s for s in exporter.get_finished_spans()
        if s.name == "batch" and any(link.context.span_id == root.context.span_id
                                     for link in s.links)
    ]
    assert len(batches) == 1
    assert batches[0].context.trace_id != trace_id


def test_one_trace_per_request_joined_to_the_callers_traceparent(
    traced: tuple[_InProcess, InMemorySpanExporter],
) -> None:
    app, exporter = traced
    body, headers = rest_body(X, {})
    rest_trace, rest_parent = 0x1234ABCD, 0x42
    reply = rest_reply(httpx.post(
        f"http://127.0.0.1:{app.port}/v2/models/tiny/infer", content=body,
        headers={**headers, "traceparent": _traceparent(rest_trace, rest_parent)}, timeout=30,
    ))
    assert reply.outcome == "ok"
    _check_trace(exporter, rest_trace, rest_parent, "rest")

    grpc_trace, grpc_parent = 0x5678EF01, 0x77
    caller = GrpcClient(f"127.0.0.1:{app.grpc_port}")
    try:
        answer = caller.send(
            grpc_request(X), metadata=(("traceparent", _traceparent(grpc_trace, grpc_parent)),)
        )
    finally:
        caller.close()
    assert answer.outcome == "ok"
    _check_trace(exporter, grpc_trace, grpc_parent, "grpc")


def test_a_failed_request_ends_its_span_with_the_error(
    traced: tuple[_InProcess, InMemorySpanExporter],
) -> None:
    app, exporter = traced
    trace_id = 0x9999
    body, headers = rest_body(X, {"keep_ratio": 7.0})
    response = httpx.post(
        f"http://127.0.0.1:{app.port}/v2/models/tiny/infer", content=body,
        headers={**headers, "traceparent": _traceparent(trace_id, 0x1)}, timeout=30,
    )
    assert response.status_code == 400
    [span] = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    assert not span.status.is_ok and "keep_ratio" in (span.status.description or "")


class _Collector(BaseHTTPRequestHandler):
    received: list[Any] = []

    def do_POST(self) -> None:  # noqa: N802 - the handler protocol's name
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            _Collector.received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_are_exported_over_otlp(integration_repository: Path, tmp_path: Path) -> None:
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    server = start_server(integration_repository, tmp_path, otel_endpoint=endpoint)
    try:
        trace_id = 0xC0FFEE
        body, headers = rest_body(X, {})
        response = httpx.post(
            f"{server.url}/v2/models/tiny/infer", content=body,
            headers={**headers, "traceparent": _traceparent(trace_id, 0x5)}, timeout=30,
        )
        assert response.status_code == 200
        assert server.stop() == 0  # the exporter flushes at shutdown
    finally:
        server.stop()
        collector.shutdown()
    spans = [
        span
        for request in _Collector.received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    ours = {s.name for s in spans if int.from_bytes(s.trace_id, "big") == trace_id}
    assert ours == {"infer tiny", "queue", "compute"}
    services = {
        a.value.string_value
        for request in _Collector.received
        for resource in request.resource_spans
        for a in resource.resource.attributes
        if a.key == "service.name"
    }
    assert services == {"gated-serve"}
