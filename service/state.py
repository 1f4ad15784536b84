"""Long-lived state of one app instance, kept on ``app.state.service``.

Routes read it; the lifespan fills it (engine loaded, models warmed up) and empties it on
shutdown. Readiness is derived from it: loaded, warmed up and not draining.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from service.batcher import DynamicBatcher
from service.engine import Engine, GateConfig, ModelInfo
from service.errors import ModelNotFound, ModelNotReady, ServerNotReady
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class ModelRuntime:
    """One served model: its metadata, current runtime gate configuration and batcher."""

    info: ModelInfo
    gate: GateConfig  # what requests without gate parameters run under; swapped atomically
    batcher: DynamicBatcher | None  # None when batching is off (one forward per request)
    inflight: int = 0


class ServiceState:
    """Everything a request needs; see the module docstring."""

    def __init__(self, settings: Settings, version: str) -> None:
        self.settings = settings
        self.version = version
        self.engine: Engine | None = None
        self.metrics: Metrics | None = None
        self.models: dict[str, ModelRuntime] = {}
        self.loaded = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining

    def check_ready(self) -> None:
        """Raise ServerNotReady (503) while loading or draining."""
        if self.draining:
            raise ServerNotReady("server is shutting down")
        if not self.loaded:
            raise ServerNotReady("server is loading its models")

    def model(self, name: str, version: str | None = None) -> ModelRuntime:
        """The runtime of ``name``; raises ModelNotFound (404) or ModelNotReady (503)."""
        runtime = self.models.get(name)
        if runtime is None:
            if not self.loaded:
                raise ModelNotReady(f"model {name!r} is not loaded yet")
            raise ModelNotFound(f"unknown model {name!r}")
        if version is not None and version != runtime.info.version:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; available: {runtime.info.version}"
            )
        return runtime

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
            logger.info("draining: readiness is off, waiting for %d requests", self.inflight())
        deadline = time.monotonic() + timeout_s
        while self.inflight() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self.inflight():
            logger.error("drain timed out with %d requests in flight", self.inflight())
            return False
        return True
