"""The application: ``create_app(settings)`` factory, lifespan, ``serve``.

One data plane (``service.dataplane``) serves two front ends: the REST app built here and the
gRPC server (``service.grpc``) the lifespan starts beside it on ``grpc_port``.

Lifecycle. The lifespan loads every model of the repository and warms it up before uvicorn
accepts connections, so readiness is never claimed early; the gRPC port opens once the models
serve. On SIGTERM (or Ctrl-C) the server first drains: readiness (REST and gRPC health) and new
inference requests answer 503 / UNAVAILABLE at once, queued and in-flight requests of both
protocols finish, and only then do uvicorn's graceful shutdown and the gRPC server's stop close
the connections. The process then exits 0; a second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from types import FrameType

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, disable_created_metrics

from service.dataplane import DataPlane
from service.engine import GATE_MODES, Engine, EngineError
from service.grpc.server import GrpcServer
from service.metrics import CONTENT_TYPE_LATEST, Metrics, render
from service.rest import admin, openapi, v2
from service.rest.errors import register_exception_handlers
from service.rest.http import HttpLimits, guarded_protocol
from service.settings import Settings
from service.state import ServiceState
from service.tracing import Tracing

logger = logging.getLogger(__name__)

# After the drain: seconds the batchers (what the drain left queued) and then the gRPC server
# get to finish, each (Settings.shutdown_timeout_s documents the whole budget).
FINAL_STOP_S = 1.0


def service_version() -> str:
    try:
        return version("gated-serve")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    engine: Engine | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """A new app serving ``settings.model_repository``; models load when the lifespan starts,
    unless ``engine`` is given already loaded and warmed up (as ``serve`` does, so that a
    model that cannot load stops the process with one line).

    Each app owns its metrics registry (a fresh one unless ``registry`` is given), so several
    apps, as in tests, never share series. ``tracing`` defaults to the exporter of
    ``settings.otel_endpoint`` (off when unset).
    """
    app = FastAPI(
        title="gated-serve",
        version=service_version(),
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    state = ServiceState(settings, service_version())
    state.tracing = (
        tracing if tracing is not None
        else Tracing.from_endpoint(settings.otel_endpoint, state.version)
    )
    app.state.service = state
    app.state.plane = DataPlane(state)
    app.state.grpc = None
    app.state.preloaded = engine
    app.state.registry = registry if registry is not None else CollectorRegistry()
    v2.add_inference_routes(app)
    app.include_router(v2.build_router())
    app.include_router(admin.build_router())
    app.include_router(admin.build_repository_router())
    app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)
    register_exception_handlers(app)
    openapi.install(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    settings = state.settings
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    engine: Engine | None = app.state.preloaded
    warmed = engine is not None
    if engine is None:
        try:
            engine = await asyncio.to_thread(
                Engine.load, settings.model_repository, settings.device, settings.torch_threads
            )
        except EngineError as err:
            logger.error("startup failed: %s", err)
            raise
    state.engine = engine
    metrics = Metrics(
        app.state.registry,
        {name: info.layers for name, info in engine.models.items()},
        GATE_MODES,
        state.version,
    )
    state.metrics = metrics
    try:
        if not warmed:
            await loop.run_in_executor(
                engine.executor,
                engine.warm_up,
                settings.max_batch_rows,
                settings.served_keep_ratios(),
                settings.required_keep_ratios(),
            )
        for name, info in engine.models.items():
            state.serve(name, info)
        # torch, fastapi and the models leave ~200k long-lived objects; every full collection
        # would walk them all (~90 ms here), a latency spike every few hundred requests. Frozen
        # objects are skipped by the collector; only what is allocated from now on is scanned.
        gc.collect()
        gc.freeze()
        state.loaded = True
        if settings.grpc_port:
            grpc_server = GrpcServer(
                app.state.plane, settings.host, settings.grpc_port, settings.max_request_bytes,
                max_calls=2 * settings.max_queue_size * max(1, len(state.models)) + 64,
            )
            try:
                await grpc_server.start()
            except OSError as err:
                logger.error("startup failed: %s", err)
                raise
            app.state.grpc = grpc_server
            state.readiness_listeners.append(grpc_server.readiness)
        logger.info(
            "ready: %d model(s) [%s] on %s in %.1f s (batching %s, max_batch_size %d, "
            "max_queue_delay_ms %g)",
            len(state.models), ", ".join(state.models),
            ", ".join(sorted({r.info.device for r in state.models.values()})),
            time.monotonic() - start, "on" if settings.batching else "off",
            settings.max_batch_size, settings.max_queue_delay_ms,
        )
        yield
    finally:
        await state.drain(settings.drain_timeout_s)
        # Batchers first: what is still queued after the drain's timeout is answered (or fails
        # with 503 / UNAVAILABLE) while the gRPC server can still deliver it.
        for runtime in state.models.values():
            if runtime.batcher is not None:  # empty unless the drain timed out
                await runtime.batcher.stop(FINAL_STOP_S)
        if app.state.grpc is not None:
            await app.state.grpc.stop(FINAL_STOP_S)
        await asyncio.to_thread(engine.close)
        state.tracing.shutdown()
        logger.info("stopped")


async def _metrics(request: Request) -> Response:
    return Response(render(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------- logging and serving


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(settings: Settings) -> None:
    """Root logging to stderr in ``settings.log_format``; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the
        # process would die of the signal instead of exiting 0 after a clean drain.
        loop = self._loop
        if self._draining or not self.started or loop is None:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        logger.info("received %s: draining", signal.Signals(sig).name)
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        await self._state.drain(self._state.settings.drain_timeout_s)
        self.should_exit = True


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the header and body limits of ``settings``."""
    return guarded_protocol(
        HttpLimits(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s)
    )


def _port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (checked before the slow model loading)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return True  # let the server report the address itself
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the server will: a port in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM; returns the process exit code.

    Errors a user can fix (empty repository, missing device, unloadable checkpoint) are logged
    as one line and give 2.
    """
    configure_logging(settings)
    # The *_created series double every scrape for no use to us; process-wide, hence here.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    # Load and warm up before the server starts: a model that cannot load (a broken checkpoint,
    # a user's factory that fails to import or raises) stops the process with one line and
    # exit code 2, before any port is bound; readiness is the same either way.
    start = time.monotonic()
    if settings.grpc_port and not _port_free(settings.host, settings.grpc_port):
        logger.error(
            "gRPC (GATED_GRPC_PORT): %s:%d is in use; choose another port or 0 to turn gRPC off",
            settings.host, settings.grpc_port,
        )
        return 2
    try:
        Engine.scan(settings.model_repository)
        Engine.check_device(settings.device)
        engine = Engine.load(settings.model_repository, settings.device, settings.torch_threads)
        engine.executor.submit(
            engine.warm_up, settings.max_batch_rows, settings.served_keep_ratios(),
            settings.required_keep_ratios(),
        ).result()
    except EngineError as err:
        logger.error("%s", err)
        return 2
    logger.info(
        "loaded and warmed up %d model(s) in %.1f s", len(engine.models), time.monotonic() - start
    )
    try:
        app = create_app(settings, engine=engine)
    except RuntimeError as err:  # tracing asked for but the SDK is missing
        logger.error("%s", err)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        lifespan="on",
        log_config=None,
        access_log=settings.access_log,
        http=http_protocol(settings),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]
        server_header=False,
    )
    server = _DrainingServer(config, app.state.service)
    server.run()
    return 0 if server.started else 2
