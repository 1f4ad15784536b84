"""OpenTelemetry tracing of inference requests, off unless ``GATED_OTEL_ENDPOINT`` is set.

Per request the data plane opens a server span (``infer <model>``), a child of the caller's W3C
``traceparent`` when one came with the request (an HTTP header, or gRPC metadata), and gives it
two children timed by the batcher: ``queue`` (admitted until its batch started) and
``compute`` (the batch's forward pass). They carry the model, the gate mode, the batch size and
the request's flops ratio. A batch is shared by several requests, hence several traces: each
batch gets a ``batch`` span of its own, linked to the span of every request it served.

Spans go out over OTLP/HTTP (protobuf) to ``<endpoint>/v1/traces`` from a background thread
(the SDK's batch processor). The SDK is an optional extra (``pip install 'gated-serve[otel]'``)
and is imported only when tracing is on; off, the request path pays one attribute test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

logger = logging.getLogger(__name__)

SCOPE = "gated-serve"


@dataclass(slots=True)
class BatchTiming:
    """When one batch computed (epoch nanoseconds, as spans want them) and how big it was;
    shared by the tickets of the batch."""

    start_ns: int
    end_ns: int = 0
    size: int = 0
    rows: int = 0


class Tracing:
    """The tracer of one app, or nothing (``enabled`` False) when tracing is off."""

    def __init__(self, provider: TracerProvider | None = None, version: str = "") -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer: Any = None
        if provider is not None:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._trace = trace
            self._tracer = provider.get_tracer(SCOPE, version)
            self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_endpoint(cls, endpoint: str | None, version: str = "") -> Tracing:
        """Export to the OTLP/HTTP collector at ``endpoint``; None: tracing off.

        The service name is ``gated-serve`` unless ``OTEL_SERVICE_NAME`` (or the SDK's other
        ``OTEL_*`` variables) say otherwise.
        """
        if endpoint is None:
            return cls()
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as err:
            raise RuntimeError(
                "GATED_OTEL_ENDPOINT is set but the OpenTelemetry SDK is not installed: "
                "pip install 'gated-serve[otel]'"
            ) from err
        resource = Resource.create({"service.name": SCOPE, "service.version": version})
        provider = TracerProvider(resource=resource)
        url = endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        logger.info("tracing: exporting spans over OTLP/HTTP to %s", url)
        return cls(provider, version)

    def shutdown(self) -> None:
        """Flush and stop the exporter (end of the lifespan)."""
        if self.provider is not None:
            self.provider.shutdown()

    # ------------------------------------------------------------------ spans

    def start_request(
        self, carrier: Mapping[str, str] | None, model: str, protocol: str
    ) -> Span:
        """The server span of one request, joined to the caller's ``traceparent``."""
        parent = self._propagator.extract(carrier) if carrier else None
        kind = self._trace.SpanKind.SERVER
        attributes = {"gated.model": model, "gated.protocol": protocol}
        if protocol == "grpc":
            attributes["rpc.system"] = "grpc"
            attributes["rpc.method"] = "ModelInfer"
        span: Span = self._tracer.start_span(
            f"infer {model}", context=parent, kind=kind, attributes=attributes
        )
        return span

    def finish_request(
        self,
        span: Span,
        *,
        model: str,
        gate_mode: str | None,
        enqueued_ns: int | None,
        batch: BatchTiming | None,
        flops_ratio: float | None,
        error: BaseException | None,
    ) -> None:
        """Add the queue child (a queued request: until its batch started, or until now if it
        never reached one) and the compute child (a finished batch), the result's attributes
        or the error, and end the span."""
        common: dict[str, Any] = {"gated.model": model}
        if gate_mode is not None:
            common["gated.gate_mode"] = gate_mode
            span.set_attribute("gated.gate_mode", gate_mode)
        parent = self._trace.set_span_in_context(span)
        if enqueued_ns is not None:
            queue = self._tracer.start_span(
                "queue", context=parent, start_time=enqueued_ns, attributes=common
            )
            queue.end(end_time=max(enqueued_ns, batch.start_ns) if batch is not None else None)
        if batch is not None and batch.end_ns:
            detail = {**common, "gated.batch_size": batch.size, "gated.batch_rows": batch.rows}
            if flops_ratio is not None:
                detail["gated.flops_ratio"] = flops_ratio
            compute = self._tracer.start_span(
                "compute", context=parent, start_time=batch.start_ns, attributes=detail
            )
            compute.end(end_time=batch.end_ns)
            span.set_attribute("gated.batch_size", batch.size)
        if flops_ratio is not None:
            span.set_attribute("gated.flops_ratio", flops_ratio)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            message = getattr(error, "message", None) or type(error).__name__
            span.set_status(Status(StatusCode.ERROR, str(message)))
            span.set_attribute("gated.error", type(error).__name__)
        span.end()

    def record_batch(
        self, model: str, gate_mode: str, timing: BatchTiming, requests: Sequence[Span | None]
    ) -> None:
        """One span per executed batch, linked to each traced request it served."""
        links = [
            self._trace.Link(span.get_span_context()) for span in requests if span is not None
        ]
        span = self._tracer.start_span(
            "batch",
            context=self._trace.set_span_in_context(self._trace.INVALID_SPAN),
            start_time=timing.start_ns,
            links=links,
            attributes={
                "gated.model": model,
                "gated.gate_mode": gate_mode,
                "gated.batch_size": timing.size,
                "gated.batch_rows": timing.rows,
            },
        )
        span.end(end_time=timing.end_ns or time.time_ns())
