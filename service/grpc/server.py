"""Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``, a thin front end of
the data plane, plus the standard ``grpc.health.v1.Health`` service.

It runs on grpcio's asyncio server in the same event loop as the REST server, on its own port
(``GATED_GRPC_PORT``, 8001 as Triton; 0 turns it off), and is started and drained with it: while
the server drains, health answers NOT_SERVING and new requests UNAVAILABLE, queued ones finish.
Errors become status codes through ``service.errors.CODES``, the table REST uses too;
``UNAVAILABLE`` carries a ``retry-after`` trailer. Admin calls (repository load and unload)
take the REST admin's token as ``authorization: Bearer <token>`` metadata. A client's deadline
bounds the request's time in the queue, and a call the client cancels is dropped before
compute. RPCs for features this server lacks answer UNIMPLEMENTED, naming the feature.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service.dataplane import DataPlane, Limits
from service.engine import ModelInfo
from service.errors import InvalidInput, ServiceError, Unavailable, Unimplemented, codes
from service.grpc import messages
from service.grpc.codec import decode_infer_request, encode_infer_response
from service.protocol.types import DecodedRequest

logger = logging.getLogger(__name__)

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

# RPCs of the protocol without a feature here, and what to say.
_UNIMPLEMENTED = {
    "ModelStreamInfer": "streaming inference (decoupled models)",
    "ModelStatistics": "model statistics (see the Prometheus metrics at /metrics instead)",
    "SystemSharedMemoryStatus": "system shared memory",
    "SystemSharedMemoryRegister": "system shared memory",
    "SystemSharedMemoryUnregister": "system shared memory",
    "CudaSharedMemoryStatus": "CUDA shared memory",
    "CudaSharedMemoryRegister": "CUDA shared memory",
    "CudaSharedMemoryUnregister": "CUDA shared memory",
    "TraceSetting": "trace settings (tracing is configured with GATED_OTEL_ENDPOINT)",
    "LogSettings": "log settings (set GATED_LOG_LEVEL at startup)",
}
# V2 datatype -> model configuration DataType enum value.
_CONFIG_TYPES = {
    "BOOL": 1, "UINT8": 2, "UINT16": 3, "UINT32": 4, "UINT64": 5, "INT8": 6, "INT16": 7,
    "INT32": 8, "INT64": 9, "FP16": 10, "FP32": 11, "FP64": 12, "BYTES": 13,
}


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _mapped(handler: Handler, parse: Callable[[bytes], Any]) -> Handler:
    """Parse the request (bytes that are not the message: INVALID_ARGUMENT, not grpcio's
    INTERNAL) and turn the typed errors of ``handler`` into gRPC statuses
    (``service.errors.CODES``)."""

    @functools.wraps(handler)
    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            try:
                request = parse(raw)
            except DecodeError:
                raise InvalidInput(
                    f"{handler.__name__}: the request is not a valid protobuf message"
                ) from None
            return await handler(request, context)
        except (ServiceError, InvalidInput) as err:
            _, name = codes(err)
            if isinstance(err, Unavailable):
                context.set_trailing_metadata((("retry-after", str(err.retry_after_s)),))
            await context.abort(grpc.StatusCode[name], err.message)
        except Exception:  # logged here, never shown to the client
            logger.exception("gRPC %s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return call


class InferenceService:
    """The handlers of ``inference.GRPCInferenceService`` over one data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    # ------------------------------------------------------------------ health and metadata

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ready = self.plane.model_ready(request.name, request.version)
        return messages.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self.plane.server_metadata()
        return messages.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=meta.extensions
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self.plane.model_metadata(request.name, request.version)
        response = messages.ModelMetadataResponse(
            name=meta.name, versions=meta.versions or [], platform=meta.platform
        )
        for target, tensors in ((response.inputs, meta.inputs), (response.outputs, meta.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return response

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        info = self.plane.model_info(request.name, request.version)
        return messages.ModelConfigResponse(config=self._config(info))

    def _config(self, info: ModelInfo) -> Any:
        # Triton's convention: with max_batch_size > 0, dims leave out the batch dimension.
        settings = self.plane.state.settings
        config = messages.ModelConfigResponse().config
        config.name = info.name
        config.platform = info.platform
        config.backend = "pytorch"
        config.max_batch_size = info.serving.resolved(settings).max_request_rows
        for target, tensors in ((config.input, info.contract.inputs),
                                (config.output, info.contract.outputs)):
            for t in tensors:
                entry = target.add(name=t.name, data_type=_CONFIG_TYPES[t.datatype])
                entry.dims.extend(t.shape[1:])
                if t.optional:  # ModelInput's field; outputs are never optional
                    entry.optional = True
        return config

    # ------------------------------------------------------------------ inference

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def decode(limits: Limits) -> DecodedRequest:
            return decode_infer_request(request, limits)

        plane = self.plane
        carrier = dict(context.invocation_metadata() or ()) if plane.tracing.enabled else None
        result = await plane.infer(
            request.model_name, request.model_version, decode, protocol="grpc",
            trace_carrier=carrier, deadline_s=context.time_remaining(),
        )
        return encode_infer_response(result)

    # ------------------------------------------------------------------ model repository

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        response = messages.RepositoryIndexResponse()
        for entry in self.plane.repository_index(request.ready):
            response.models.add(
                name=entry.name, version=entry.version or "", state=entry.state or "",
                reason=entry.reason or "",
            )
        return response

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.plane.authorize(_metadata(context, "authorization"))
        await self.plane.load(request.model_name, list(request.parameters))
        return messages.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        self.plane.authorize(_metadata(context, "authorization"))
        await self.plane.unload(request.model_name)
        return messages.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------ registration

    def handler(self) -> grpc.GenericRpcHandler:
        """Every RPC of the service, with its (de)serialisers from the protocol's messages."""
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in messages.SERVICE_DESCRIPTOR.methods:
            name = method.name
            decode = messages.request_class(name).FromString
            encode = messages.response_class(name).SerializeToString
            if name in _UNIMPLEMENTED:
                handlers[name] = _unimplemented(name, method.client_streaming, decode, encode)
                continue
            # Requests arrive as bytes and are parsed inside, where errors are mapped.
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _mapped(getattr(self, name), decode), response_serializer=encode
            )
        return grpc.method_handlers_generic_handler(messages.SERVICE, handlers)


def _unimplemented(
    name: str, streaming: bool, decode: Callable[[bytes], Any], encode: Callable[[Any], bytes]
) -> grpc.RpcMethodHandler:
    message = f"{name}: {_UNIMPLEMENTED[name]} is not supported by this server"
    code = grpc.StatusCode[codes(Unimplemented(message))[1]]

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    make = (
        grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    )
    return make(refuse, request_deserializer=decode, response_serializer=encode)


class GrpcServer:
    """The gRPC server of one app: started after the models are ready, stopped after the
    drain."""

    def __init__(
        self, plane: DataPlane, host: str, port: int, max_message_bytes: int, max_calls: int
    ) -> None:
        self.plane = plane
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.max_calls = max_calls
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Raises OSError when the port is taken."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                # One server per port: a port in use is an error, never a silent share.
                ("grpc.so_reuseport", 0),
            ],
            # Calls in progress in all: past it grpcio answers RESOURCE_EXHAUSTED before
            # reading the message (the queues behind hold far fewer anyway).
            maximum_concurrent_rpcs=self.max_calls,
        )
        server.add_generic_rpc_handlers((InferenceService(self.plane).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        address = f"{host}:{self.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(
                f"gRPC (GATED_GRPC_PORT): cannot listen on {address}; is the port in use? "
                "(0 turns gRPC off)"
            )
        await server.start()
        self._server = server
        self.port = int(port)
        await self.set_serving(True)
        logger.info("gRPC: serving on %s:%d", self.host, port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", messages.SERVICE):
            await self.health.set(service, status)

    def readiness(self, ready: bool) -> None:
        """Readiness changed (a drain started, the last model was unloaded, one was loaded):
        the health service follows."""
        if self._server is not None:
            task = asyncio.get_running_loop().create_task(self.set_serving(ready))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self, grace_s: float) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)
