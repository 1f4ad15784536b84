"""One small V2 client per protocol, so that reliability tests run unchanged over REST and gRPC.

Each answer becomes a ``Reply`` whose ``outcome`` is read from the protocol's own code through
the tables below (written here, independently of the server's), so a test that expects
``"unavailable"`` checks 503 over REST and UNAVAILABLE over gRPC.

gRPC messages are tritonclient's generated ones: the server's own copy of the protocol is not
used by its tests (only its helper that fills an ``InferParameter`` map, which works on any).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
from tritonclient.grpc import service_pb2

from service.grpc.codec import fill_parameters

PROTOCOLS = ("rest", "grpc")
SERVICE = "/inference.GRPCInferenceService/"

HTTP_OUTCOMES = {
    200: "ok", 400: "invalid", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
    413: "too_large", 503: "unavailable", 504: "deadline",
}
GRPC_OUTCOMES = {
    grpc.StatusCode.OK: "ok",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "forbidden",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "too_large",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
}


@dataclass
class Reply:
    outcome: str  # "ok" or one of the tables' values ("other:<code>" when unknown)
    message: str = ""
    retry_after: str | None = None
    logits: np.ndarray | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- REST


def rest_body(x: np.ndarray, parameters: Mapping[str, object]) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor request for ``x`` with binary outputs."""
    header = orjson.dumps({
        "parameters": {"binary_data_output": True, **parameters},
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
    })
    return header + np.ascontiguousarray(x, "<f4").tobytes(), {
        "Inference-Header-Content-Length": str(len(header))
    }


def rest_reply(response: httpx.Response) -> Reply:
    outcome = HTTP_OUTCOMES.get(response.status_code, f"other:{response.status_code}")
    if response.status_code != 200:
        return Reply(outcome, response.json()["error"], response.headers.get("retry-after"))
    length = int(response.headers["inference-header-content-length"])
    doc = orjson.loads(response.content[:length])
    [out] = doc["outputs"]
    logits = np.frombuffer(response.content[length:], "<f4").reshape(out["shape"])
    return Reply("ok", logits=logits, parameters=doc.get("parameters", {}))


class RestClient:
    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url
        self._client = httpx.Client(timeout=timeout_s)

    def infer(self, x: np.ndarray, model: str = "tiny", **parameters: object) -> Reply:
        body, headers = rest_body(x, parameters)
        reply = self._client.post(f"{self.url}/v2/models/{model}/infer", content=body,
                                  headers=headers)
        return rest_reply(reply)

    def ready(self) -> bool:
        return self._client.get(f"{self.url}/v2/health/ready").status_code == 200

    def close(self) -> None:
        self._client.close()


# ---------------------------------------------------------------------- gRPC


def grpc_request(
    x: np.ndarray, model: str = "tiny", parameters: Mapping[str, object] | None = None
) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest for ``x`` with raw contents, as tritonclient sends it."""
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32")
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    fill_parameters(request.parameters, parameters or {})
    return request


def _parameters(entries: Any) -> dict[str, Any]:
    out = {}
    for key, value in entries.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = None if choice is None else getattr(value, choice)
    return out


def grpc_reply(response: service_pb2.ModelInferResponse) -> Reply:
    [out] = response.outputs
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(out.shape))
    return Reply("ok", logits=logits, parameters=_parameters(response.parameters))


def grpc_error(err: grpc.RpcError) -> Reply:
    code = err.code()  # type: ignore[attr-defined]
    trailers = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return Reply(GRPC_OUTCOMES.get(code, f"other:{code.name}"), err.details() or "",  # type: ignore[attr-defined]
                 trailers.get("retry-after"))


def _method(channel: Any, name: str, response: Any) -> Any:
    return channel.unary_unary(
        SERVICE + name, request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


class GrpcClient:
    """Plain stub calls over one channel (the tests also use tritonclient.grpc itself)."""

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(address)
        self._infer = _method(self.channel, "ModelInfer", service_pb2.ModelInferResponse)
        self._ready = _method(self.channel, "ServerReady", service_pb2.ServerReadyResponse)

    def infer(self, x: np.ndarray, model: str = "tiny", **parameters: object) -> Reply:
        return self.send(grpc_request(x, model, parameters))

    def send(self, request: Any, timeout_s: float | None = None,
             metadata: tuple[tuple[str, str], ...] = ()) -> Reply:
        try:
            response = self._infer(
                request, timeout=self.timeout_s if timeout_s is None else timeout_s,
                metadata=metadata,
            )
        except grpc.RpcError as err:
            return grpc_error(err)
        return grpc_reply(response)

    def ready(self) -> bool:
        try:
            return bool(self._ready(service_pb2.ServerReadyRequest(), timeout=5).ready)
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self.channel.close()


class AsyncGrpcClient:
    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.channel = grpc.aio.insecure_channel(address)
        self._infer = _method(self.channel, "ModelInfer", service_pb2.ModelInferResponse)

    async def infer(self, x: np.ndarray, model: str = "tiny", **parameters: object) -> Reply:
        try:
            response = await self._infer(grpc_request(x, model, parameters),
                                         timeout=self.timeout_s)
        except grpc.RpcError as err:
            return grpc_error(err)
        return grpc_reply(response)

    async def close(self) -> None:
        await self.channel.close()


class AsyncRestClient:
    def __init__(self, url: str, timeout_s: float = 30.0, connections: int = 100) -> None:
        self.url = url
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.AsyncClient(timeout=timeout_s, limits=limits)

    async def infer(self, x: np.ndarray, model: str = "tiny", **parameters: object) -> Reply:
        body, headers = rest_body(x, parameters)
        reply = await self._client.post(f"{self.url}/v2/models/{model}/infer", content=body,
                                        headers=headers)
        return rest_reply(reply)

    async def close(self) -> None:
        await self._client.aclose()


def client(protocol: str, server: Any, timeout_s: float = 30.0) -> RestClient | GrpcClient:
    """A blocking client of ``server`` (a LocalServer) over ``protocol``."""
    if protocol == "rest":
        return RestClient(server.url, timeout_s)
    return GrpcClient(server.grpc_address, timeout_s)


def async_client(
    protocol: str, server: Any, timeout_s: float = 30.0, connections: int = 100
) -> AsyncRestClient | AsyncGrpcClient:
    if protocol == "rest":
        return AsyncRestClient(server.url, timeout_s, connections)
    return AsyncGrpcClient(server.grpc_address, timeout_s)
