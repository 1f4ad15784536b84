"""Long-lived state of one app instance, kept on ``app.state.service``.

Routes read it; the lifespan fills it (engine loaded, models warmed up) and empties it on
shutdown. Readiness is derived from it, by one rule: every model loaded and warmed up, at least
one model served (a server whose models were all unloaded serves nothing), and not draining.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.batcher import DynamicBatcher
from service.engine import Engine, EngineError, GateConfig, ModelInfo, ModelNotInRepository
from service.errors import ModelLoadFailed, ModelNotFound, ModelNotReady, ServerNotReady
from service.metrics import Metrics
from service.protocol.errors import shown
from service.settings import Settings
from service.tracing import Tracing

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class ModelRuntime:
    """One served model: its metadata, current runtime gate configuration and batcher."""

    info: ModelInfo
    gate: GateConfig  # what requests without gate parameters run under; swapped atomically
    batcher: DynamicBatcher | None  # None when batching is off (one forward per request)
    inflight: int = 0  # accepted requests (body read), not yet answered: what a drain awaits
    reading: int = 0  # requests whose body is still being read: batch mates on their way


class ServiceState:
    """Everything a request needs; see the module docstring."""

    def __init__(self, settings: Settings, version: str) -> None:
        self.settings = settings
        self.version = version
        self.engine: Engine | None = None
        # The app's tracer (off unless the app sets one): batches link their requests' spans.
        self.tracing = Tracing()
        self.metrics: Metrics | None = None
        self.models: dict[str, ModelRuntime] = {}
        self.loaded = False
        self.draining = False
        # Serialises repository load/unload calls; inference never takes it.
        self.repository_lock = asyncio.Lock()
        # Called with the new readiness whenever it may have changed (models served or
        # unloaded, drain started): the gRPC health service follows it.
        self.readiness_listeners: list[Callable[[bool], None]] = []
        # Repository models not served now, with why ("unloaded through the repository API").
        self.unavailable: dict[str, str] = {}
        # Served models whose last load through the repository API failed (the previous load
        # still serves), with the error.
        self.load_failures: dict[str, str] = {}

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining and bool(self.models)

    def check_ready(self) -> None:
        """Raise ServerNotReady (503) while loading or draining."""
        if self.draining:
            raise ServerNotReady("server is shutting down")
        if not self.loaded:
            raise ServerNotReady("server is loading its models")

    def check_serving(self) -> None:
        """Readiness: check_ready, and at least one model served (else 503 saying so)."""
        self.check_ready()
        if not self.models:
            raise ServerNotReady(
                "no model is served: every model was unloaded (load one through the repository "
                "API)"
            )

    def _readiness_changed(self) -> None:
        ready = self.ready
        for listener in self.readiness_listeners:
            listener(ready)

    def model(self, name: str, version: str | None = None) -> ModelRuntime:
        """The runtime of ``name``; raises ModelNotFound (404) or ModelNotReady (503)."""
        runtime = self.models.get(name)
        if runtime is None:
            if not self.loaded:
                raise ModelNotReady(f"model {shown(name)} is not loaded yet")
            why = self.unavailable.get(name)
            if why is not None:
                raise ModelNotFound(f"model {shown(name)} is not served: {why}")
            raise ModelNotFound(f"unknown model {shown(name)}")
        if version is not None and version != runtime.info.version:
            raise ModelNotFound(
                f"model {shown(name)} has no version {shown(version)}; available: "
                f"{runtime.info.version}"
            )
        return runtime

    def serve(self, name: str, info: ModelInfo) -> ModelRuntime:
        """Start serving the loaded engine model ``name``: default gate, batcher, metrics."""
        engine, metrics, settings = self.engine, self.metrics, self.settings
        assert engine is not None and metrics is not None  # the lifespan set both
        mode = settings.default_gate_mode
        keep = settings.default_keep_ratio if mode != "dense" else None
        runtime = ModelRuntime(info=info, gate=engine.resolve_gate(name, mode, keep), batcher=None)
        bounds = info.serving.resolved(settings)
        if settings.batching:
            runtime.batcher = DynamicBatcher(
                model=name,
                compute=functools.partial(engine.infer, name),
                executor=engine.executor,
                metrics=metrics,
                max_batch_size=bounds.max_batch_size,
                max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
                max_queue_size=settings.max_queue_size,
                max_batch_rows=bounds.max_batch_rows,
                inflight=_coming_of(runtime),
                same_length=not info.mixed_lengths,
                tracing=self.tracing,
                fill_fraction=settings.batch_fill_fraction,
            )
            runtime.batcher.start()
        self.models[name] = runtime
        self.unavailable.pop(name, None)
        metrics.watch(name, _depth_of(runtime.batcher), _inflight_of(runtime))
        metrics.set_gate(name, runtime.gate.mode, runtime.gate.keep_ratio)
        metrics.model_ready.labels(name).set(1)
        self._readiness_changed()
        return runtime

    async def reload(self, name: str) -> ModelRuntime:
        """Load ``name``'s checkpoint again and swap it in under load (model repository API).

        Requests keep flowing: the batcher looks the model up by name on every batch, so the
        swap on the compute thread is the only switch point. Raises ModelNotFound when the
        repository has no such model.
        """
        engine = self.engine
        assert engine is not None  # callers check readiness first
        try:
            info = await asyncio.to_thread(engine.load_model, name)
        except ModelNotInRepository as err:
            raise ModelNotFound(str(err)) from None
        except EngineError as err:  # it exists but does not load: the request names a bad model
            if name in self.models:
                self.load_failures[name] = str(err)
            else:
                self.unavailable[name] = f"load failed: {err}"
            raise ModelLoadFailed(str(err)) from None
        self.load_failures.pop(name, None)
        runtime = self.models.get(name)
        if runtime is None:
            return self.serve(name, info)
        runtime.info = info
        # The runtime gate's plan key belongs to the old network: resolve it for the new one.
        g = runtime.gate
        runtime.gate = engine.resolve_gate(
            name, g.mode, g.keep_ratio, g.threshold, g.dynamic_weight
        )
        return runtime

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404, queued ones are still answered."""
        runtime = self.model(name)
        del self.models[name]
        self.unavailable[name] = "unloaded through the repository API"
        self._readiness_changed()
        if self.metrics is not None:
            self.metrics.model_ready.labels(name).set(0)
        if runtime.batcher is not None:
            await runtime.batcher.stop(self.settings.drain_timeout_s)
        engine = self.engine
        assert engine is not None
        await asyncio.to_thread(engine.unload_model, name)

    def inflight(self) -> int:
        return sum(r.inflight for r in self.models.values())

    async def drain(self, timeout_s: float) -> bool:
        """Turn readiness off and wait until every accepted request is answered.

        Returns False when requests were still in flight after ``timeout_s``.
        """
        if not self.draining:
            self.draining = True
            if self.metrics is not None:
                for name in self.models:
                    self.metrics.model_ready.labels(name).set(0)
            self._readiness_changed()
            logger.info("draining: readiness is off, waiting for %d requests", self.inflight())
        deadline = time.monotonic() + timeout_s
        while self.inflight() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self.inflight():
            logger.error("drain timed out with %d requests in flight", self.inflight())
            return False
        return True


def _depth_of(batcher: DynamicBatcher | None) -> Callable[[], int]:
    return (lambda: batcher.depth) if batcher is not None else (lambda: 0)


def _coming_of(runtime: ModelRuntime) -> Callable[[], int]:
    # What the batcher may wait for: accepted requests and those still arriving.
    return lambda: runtime.inflight + runtime.reading


def _inflight_of(runtime: ModelRuntime) -> Callable[[], int]:
    return lambda: runtime.inflight
