"""Hot reload through the model repository API on a real server, under load.

``POST /v2/repository/models/{m}/load`` (gRPC: ``RepositoryModelLoad``) swaps in the checkpoint
now in the repository while requests flow: none may fail, and answers after the swap must equal
the new checkpoint's own forward. Unload makes the model 404 (NOT_FOUND); load/unload cycles
must not leak memory. The token is the same on both protocols.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from models import load_checkpoint, save_checkpoint
from tests.integration.conftest import Server, serving
from tests.utils.clients import client
from tests.utils.service import (
    ADMIN_TOKEN,
    json_request,
    make_repository,
    metric,
    reference_logits,
    tiny_network,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
X = np.random.default_rng(3).standard_normal((2, 24)).astype(np.float32)
BODY = orjson.dumps(json_request(X))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("reload-repository"), ("tiny",))


@pytest.fixture(scope="module")
def reload_server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        repository, tmp_path_factory.mktemp("logs"),
        admin_token=ADMIN_TOKEN, max_batch_size=8, max_queue_delay_ms=2,
    ) as srv:
        yield srv


def _logits(response: httpx.Response) -> np.ndarray:
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def test_repository_calls_need_the_admin_token(reload_server: Server) -> None:
    url = f"{reload_server.url}/v2/repository/models/tiny"
    assert httpx.post(f"{url}/load").status_code == 401
    assert httpx.post(f"{url}/unload", headers={"Authorization": "Bearer wrong"}).status_code == 403
    missing = httpx.post(f"{reload_server.url}/v2/repository/models/nope/load", headers=AUTH)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_grpc_repository_calls_need_the_admin_token(reload_server: Server) -> None:
    triton = triton_grpc.InferenceServerClient(reload_server.grpc_address)
    try:
        for headers, code in (
            (None, "StatusCode.UNAUTHENTICATED"),
            ({"authorization": "Bearer wrong"}, "StatusCode.PERMISSION_DENIED"),
        ):
            with pytest.raises(InferenceServerException) as refused:
                triton.load_model("tiny", headers=headers)
            assert refused.value.status() == code
        with pytest.raises(InferenceServerException) as missing:
            triton.unload_model("nope", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert missing.value.status() == "StatusCode.NOT_FOUND" and "nope" in str(missing.value)
    finally:
        triton.close()


def _load(protocol: str, server: Server) -> str:
    """Reload tiny over ``protocol``; "ok" or the failure."""
    if protocol == "rest":
        reply = httpx.post(
            f"{server.url}/v2/repository/models/tiny/load", headers=AUTH, timeout=15.0
        )
        return "ok" if reply.status_code == 200 else reply.text
    triton = triton_grpc.InferenceServerClient(server.grpc_address)
    try:
        triton.load_model(
            "tiny", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, client_timeout=15.0
        )
    except InferenceServerException as err:
        return str(err)
    finally:
        triton.close()
    return "ok"


@pytest.mark.parametrize(("protocol", "seed"), [("rest", 7), ("grpc", 8)])
def test_hot_reload_under_load_swaps_weights_without_failures(
    reload_server: Server, repository: Path, protocol: str, seed: int
) -> None:
    """Traffic and the reload both over ``protocol``."""
    old = reference_logits(load_checkpoint(repository / "tiny"), X)
    new_net = tiny_network(seed=seed)
    new = reference_logits(new_net, X)
    assert not np.allclose(old, new, atol=1e-3)
    save_checkpoint(new_net, repository / "tiny")

    failures: list[str] = []
    answers: list[np.ndarray] = []
    stop = threading.Event()

    def flow() -> None:
        caller = client(protocol, reload_server, 15.0)
        try:
            while not stop.is_set():
                reply = caller.infer(X)
                if reply.outcome != "ok":
                    failures.append(f"{reply.outcome} {reply.message[:200]}")
                else:
                    assert reply.logits is not None
                    answers.append(reply.logits)
        finally:
            caller.close()

    threads = [threading.Thread(target=flow) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(answers) < 20 and not failures:  # clients are flowing before the swap
            time.sleep(0.01)
        loaded = _load(protocol, reload_server)
        # Then let some requests run on the new weights before stopping the clients.
        wanted, deadline = len(answers) + 20, time.monotonic() + 10.0
        while len(answers) < wanted and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(20.0)
    assert loaded == "ok", loaded
    assert not failures, failures[:5]
    assert any(np.allclose(a, old, atol=1e-4) for a in answers)  # the swap happened under load
    for logits in answers:  # every answer comes from one set of weights or the other
        assert np.allclose(logits, old, atol=1e-4) or np.allclose(logits, new, atol=1e-4)
    after = httpx.post(f"{reload_server.url}/v2/models/tiny/infer", content=BODY, timeout=15.0)
    np.testing.assert_allclose(_logits(after), new, atol=1e-5)
    np.testing.assert_allclose(answers[-1], new, atol=1e-5)


def test_unload_then_load_cycles_do_not_leak(reload_server: Server) -> None:
    base = reload_server.url
    repo_url = f"{base}/v2/repository/models/tiny"
    with httpx.Client(timeout=15.0, headers=AUTH) as c:
        assert c.post(f"{base}/v2/models/tiny/infer", content=BODY).status_code == 200
        start = _rss_kib(reload_server.process.pid)
        for _ in range(10):
            assert c.post(f"{repo_url}/unload").status_code == 200
            assert c.post(f"{base}/v2/models/tiny/infer", content=BODY).status_code == 404
            assert c.get(f"{base}/v2/models/tiny/ready").status_code == 404
            assert c.post(f"{repo_url}/load").status_code == 200
            assert c.post(f"{base}/v2/models/tiny/infer", content=BODY).status_code == 200
        end = _rss_kib(reload_server.process.pid)
        assert c.get(f"{base}/v2/health/ready").status_code == 200
    assert end < start * 1.10, (start, end)


def test_grpc_unload_then_load(reload_server: Server) -> None:
    """Over gRPC: unload makes the model NOT_FOUND on both protocols, load brings it back."""
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    triton = triton_grpc.InferenceServerClient(reload_server.grpc_address)
    caller = client("grpc", reload_server)
    try:
        triton.unload_model("tiny", headers=auth)
        assert caller.infer(X).outcome == "not_found"
        gone = httpx.post(f"{reload_server.url}/v2/models/tiny/infer", content=BODY)
        assert gone.status_code == 404
        # Honest state: the index lists it unavailable with the reason, and a server that
        # serves no model is not ready (REST 503 saying so, gRPC ServerReady false and health
        # NOT_SERVING), until a model is loaded again.
        [entry] = triton.get_model_repository_index().models
        assert (entry.name, entry.state) == ("tiny", "UNAVAILABLE") and "unloaded" in entry.reason
        ready = httpx.get(f"{reload_server.url}/v2/health/ready")
        assert ready.status_code == 503 and "no model is served" in ready.json()["error"]
        assert not triton.is_server_ready()
        channel = grpc.insecure_channel(reload_server.grpc_address)
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        deadline = time.monotonic() + 5
        while health.Check(request, timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING with no model served"
            time.sleep(0.02)
        index = httpx.post(f"{reload_server.url}/v2/repository/index").json()
        assert index == [{"name": "tiny", "version": None, "state": "UNAVAILABLE",
                          "reason": "unloaded through the repository API"}]
        triton.load_model("tiny", headers=auth)
        assert triton.is_model_ready("tiny") and triton.is_server_ready()
        assert caller.infer(X).outcome == "ok"
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    finally:
        caller.close()
        triton.close()


def test_unload_while_a_body_is_arriving_is_a_404_naming_the_model(reload_server: Server) -> None:
    """The request found the model, then the model went away before its body was read: it is
    answered 404 (not a KeyError 500, not a "shutting down" 503), and the model loads back."""
    body = BODY
    with socket.create_connection(("127.0.0.1", reload_server.port), timeout=15) as sock:
        sock.sendall(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: test\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:10]
        )
        time.sleep(0.5)  # the handler has found the model and waits for the body
        # A body still arriving is not accepted yet: nothing is in flight.
        assert metric(reload_server.url, "gated_inflight_requests", model="tiny") == 0
        unloaded = httpx.post(
            f"{reload_server.url}/v2/repository/models/tiny/unload", headers=AUTH, timeout=15
        )
        assert unloaded.status_code == 200, unloaded.text
        sock.sendall(body[10:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404"), answer[:300]
    assert b"unloaded while the request was read" in answer
    loaded = httpx.post(
        f"{reload_server.url}/v2/repository/models/tiny/load", headers=AUTH, timeout=15
    )
    assert loaded.status_code == 200
    assert "Traceback" not in reload_server.output()


def test_load_parameters_are_refused_on_both_protocols(reload_server: Server) -> None:
    """Triton's config / file overrides cannot be honoured: 400 / INVALID_ARGUMENT naming them,
    and the model keeps serving."""
    rest = httpx.post(
        f"{reload_server.url}/v2/repository/models/tiny/load", headers=AUTH, timeout=15,
        json={"parameters": {"config": "{}"}},
    )
    assert rest.status_code == 400 and "'config'" in rest.json()["error"]
    bad_body = httpx.post(
        f"{reload_server.url}/v2/repository/models/tiny/load", headers=AUTH, timeout=15,
        content=b"[1]",
    )
    assert bad_body.status_code == 400 and "parameters" in bad_body.json()["error"]
    triton = triton_grpc.InferenceServerClient(reload_server.grpc_address)
    try:
        with pytest.raises(InferenceServerException) as refused:
            triton.load_model("tiny", headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                              config="{}")
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'config'" in str(refused.value)
        assert triton.is_model_ready("tiny")
    finally:
        triton.close()


def test_failed_loads_are_listed_with_their_reason(
    reload_server: Server, repository: Path
) -> None:
    """A load that fails is a 400 naming the model; the index says what serves and why not:
    a served model keeps its previous load (READY, the failure as reason), a new folder that
    does not load is UNAVAILABLE with the failure."""
    index_url = f"{reload_server.url}/v2/repository/index"
    weights = repository / "tiny" / "model.safetensors"
    good = weights.read_bytes()
    broken = repository / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("model: {name: conv, channels: 4}\n")
    try:
        weights.write_bytes(b"not safetensors")
        for name in ("tiny", "broken"):
            reply = httpx.post(f"{reload_server.url}/v2/repository/models/{name}/load",
                               headers=AUTH, timeout=15)
            assert reply.status_code == 400 and f"model '{name}'" in reply.json()["error"]
        index = {e["name"]: e for e in httpx.post(index_url).json()}
        assert index["tiny"]["state"] == "READY"
        assert index["tiny"]["reason"].startswith("serving the previous load; the last load "
                                                  "failed: model 'tiny'")
        assert index["broken"]["state"] == "UNAVAILABLE"
        assert index["broken"]["reason"].startswith("load failed: model 'broken'")
        assert client("rest", reload_server).infer(X).outcome == "ok"  # the previous load serves
    finally:
        weights.write_bytes(good)
        for path in broken.iterdir():
            path.unlink()
        broken.rmdir()
    reply = httpx.post(f"{reload_server.url}/v2/repository/models/tiny/load", headers=AUTH,
                       timeout=15)
    assert reply.status_code == 200
    assert httpx.post(index_url).json() == [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
