"""Prometheus metrics of the service, on a registry owned by one app instance.

Names follow Prometheus practice: ``gated_`` prefix, base units (seconds, ratios in [0, 1]),
``_total`` on counters. Labels come from fixed sets only (model names of the repository, gate
modes, gated layers of a model, and the ``OUTCOMES`` / ``REJECT_REASONS`` below); every label
combination is created up front so that series exist, at zero, before the first request.
Gauges that mirror live state (queue depth, in-flight requests) are read at scrape time through
callbacks, so the request path pays nothing for them.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "OUTCOMES", "PROTOCOLS", "REJECT_REASONS", "Metrics", "render"]

# The front ends a request can arrive through.
PROTOCOLS: tuple[str, ...] = ("rest", "grpc")

# How a request ended. success: 200; invalid: 400/404/413; rejected: 503 (queue full, not
# ready, draining); timeout: 504; cancelled: the client left before compute; error: 500.
OUTCOMES: tuple[str, ...] = ("success", "invalid", "rejected", "timeout", "cancelled", "error")
# Why a request was refused before compute; the unknown-model case carries no model label.
REJECT_REASONS: tuple[str, ...] = (
    "invalid_input",
    "unknown_model",
    "body_too_large",
    "queue_full",
    "not_ready",
    "timeout",
    "client_disconnected",
    "unauthorized",
    "forbidden",
)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)
_COMPUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    """Every metric of one app; ``models`` maps each served model to its gated layer names."""

    def __init__(
        self,
        registry: CollectorRegistry,
        models: Mapping[str, Iterable[str]],
        gate_modes: Iterable[str],
        version: str,
    ) -> None:
        self.registry = registry
        self.gate_modes = tuple(gate_modes)
        r = registry
        self.requests = Counter(
            "gated_requests", "Inference requests by final outcome and protocol.",
            ["model", "outcome", "protocol"], registry=r,
        )
        self.request_seconds = Histogram(
            "gated_request_duration_seconds",
            "Inference request time from body received to response ready.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "gated_queue_duration_seconds",
            "Time a request waited in the batcher queue before its batch started.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.compute_seconds = Histogram(
            "gated_compute_duration_seconds",
            "Time of one batch forward pass, padding and unpadding included.",
            ["model", "gate_mode"], buckets=_COMPUTE_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "gated_batch_size",
            "Requests per executed batch.",
            ["model"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.active_channel_ratio = Histogram(
            "gated_request_active_channel_ratio",
            "Per request: kept / total gated channels, mean over layers and rows.",
            ["model", "gate_mode"], buckets=_RATIO_BUCKETS, registry=r,
        )
        self.flops_ratio = Histogram(
            "gated_request_flops_ratio",
            "Per request: executed / dense multiply-accumulates.",
            ["model", "gate_mode"], buckets=_RATIO_BUCKETS, registry=r,
        )
        self.layer_active_ratio = Histogram(
            "gated_layer_active_channel_ratio",
            "Per request and gated layer: kept / total channels.",
            ["model", "layer"], buckets=_RATIO_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "gated_queue_depth", "Requests waiting in the batcher queue.", ["model"], registry=r
        )
        self.inflight = Gauge(
            "gated_inflight_requests",
            "Inference requests received and not yet answered.", ["model"], registry=r,
        )
        self.model_ready = Gauge(
            "gated_model_ready", "1 when the model is loaded, warmed up and serving.", ["model"],
            registry=r,
        )
        self.gate_mode = Gauge(
            "gated_gate_mode", "1 for the model's current runtime gate mode, 0 for the others.",
            ["model", "gate_mode"], registry=r,
        )
        self.gate_keep_ratio = Gauge(
            "gated_gate_keep_ratio",
            "Current runtime keep ratio (0 when the runtime policy has none).", ["model"],
            registry=r,
        )
        self.gate_switches = Counter(
            "gated_gate_mode_switches", "Runtime gate configuration changes via the admin API.",
            ["model", "gate_mode"], registry=r,
        )
        self.rejected = Counter(
            "gated_rejected_requests", "Requests refused before compute, by reason.", ["reason"],
            registry=r,
        )
        self.build_info = Info("gated_build", "Service build information.", registry=r)
        self._series: dict[str, ModelSeries] = {}
        self.build_info.info({"version": version, "python": platform.python_version()})

        # Pre-create every series (Prometheus practice: missing series break rate() queries).
        for model, layers in models.items():
            for outcome in OUTCOMES:
                for protocol in PROTOCOLS:
                    self.requests.labels(model, outcome, protocol)
            for metric in (self.request_seconds, self.queue_seconds, self.batch_size):
                metric.labels(model)
            for mode in self.gate_modes:
                for metric in (self.compute_seconds, self.active_channel_ratio, self.flops_ratio):
                    metric.labels(model, mode)
                self.gate_switches.labels(model, mode)
                self.gate_mode.labels(model, mode)
            for layer in layers:
                self.layer_active_ratio.labels(model, layer)
            self.model_ready.labels(model).set(0)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def outcomes(self, model: str) -> ModelSeries:
        """The per-request series of ``model``, looked up once (``labels()`` costs
        microseconds a request should not pay several times over)."""
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = ModelSeries(self, model)
        return series

    def watch(
        self, model: str, queue_depth: Callable[[], int], inflight: Callable[[], int]
    ) -> None:
        """Read queue depth and in-flight count from live state at scrape time."""
        self.queue_depth.labels(model).set_function(queue_depth)
        self.inflight.labels(model).set_function(inflight)

    def set_gate(self, model: str, mode: str, keep_ratio: float | None) -> None:
        for m in self.gate_modes:
            self.gate_mode.labels(model, m).set(1.0 if m == mode else 0.0)
        self.gate_keep_ratio.labels(model).set(keep_ratio if keep_ratio is not None else 0.0)


class ModelSeries:
    """The children of one model's per-request metrics, resolved once."""

    __slots__ = ("_layer_ratio", "_layers", "_model", "active", "flops", "request_seconds",
                 "success")

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._model = model
        self.success = {p: metrics.requests.labels(model, "success", p) for p in PROTOCOLS}
        self.request_seconds = metrics.request_seconds.labels(model)
        self.active = {m: metrics.active_channel_ratio.labels(model, m) for m in metrics.gate_modes}
        self.flops = {m: metrics.flops_ratio.labels(model, m) for m in metrics.gate_modes}
        self._layer_ratio = metrics.layer_active_ratio
        self._layers: dict[str, Any] = {}  # filled as layers are seen (a reload may add some)

    def layer(self, layer: str) -> Any:
        child = self._layers.get(layer)
        if child is None:
            child = self._layers[layer] = self._layer_ratio.labels(self._model, layer)
        return child


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of ``registry``."""
    return generate_latest(registry)
