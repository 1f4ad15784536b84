"""Switch storm on a real server: 50 runtime gate switches while 2,000 requests flow, over REST
(tritonclient.http) and over gRPC (tritonclient.grpc).

No request fails, and every response is the solo reference forward of the gate configuration
its own parameters name: a switch lands between batches, never inside one, whichever protocol
carried the request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton

from models import load_checkpoint
from tests.integration.conftest import Server, serving
from tests.utils.service import ADMIN_TOKEN, metric, reference_logits

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REQUESTS = 2000
SWITCHES_METRIC = "gated_gate_mode_switches_total"
SWITCHES = 50
WORKERS = 8
INPUTS = 16
# Runtime configurations the storm cycles through (admin PUT bodies).
GATES: tuple[dict[str, object], ...] = (
    {"mode": "dense"},
    {"mode": "static"},
    {"mode": "dynamic", "keep_ratio": 0.25},
    {"mode": "static", "keep_ratio": 0.5},
    {"mode": "dynamic"},
)


@pytest.fixture(scope="module")
def storm_server(
    integration_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(
        integration_repository, tmp_path_factory.mktemp("storm"),
        admin_token=ADMIN_TOKEN, max_batch_size=8, max_queue_delay_ms=2,
    ) as srv:
        yield srv


Call = Callable[[np.ndarray, int], tuple[str, float, np.ndarray]]


def _rest_call(server: Server) -> tuple[Call, Any]:
    client = triton.InferenceServerClient(server.address, network_timeout=30)

    def infer(x: np.ndarray, n: int) -> tuple[str, float, np.ndarray]:
        inp = triton.InferInput("input", [1, 40], "FP32")
        inp.set_data_from_numpy(x, binary_data=n % 2 == 0)
        out = triton.InferRequestedOutput("logits", binary_data=n % 3 != 0)
        reply = client.infer("tiny", [inp], outputs=[out])  # raises on any non-200
        params = reply.get_response()["parameters"]
        return str(params["gate_mode"]), float(params["keep_ratio"]), reply.as_numpy("logits")[0]

    return infer, client


def _grpc_call(server: Server) -> tuple[Call, Any]:
    client = triton_grpc.InferenceServerClient(server.grpc_address)

    def infer(x: np.ndarray, n: int) -> tuple[str, float, np.ndarray]:
        inp = triton_grpc.InferInput("input", [1, 40], "FP32")
        inp.set_data_from_numpy(x)
        reply = client.infer(  # raises on any status but OK
            "tiny", [inp], outputs=[triton_grpc.InferRequestedOutput("logits")],
            client_timeout=30,
        )
        params = reply.get_response().parameters
        return (params["gate_mode"].string_param, params["keep_ratio"].double_param,
                reply.as_numpy("logits")[0])

    return infer, client


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_switch_storm_loses_nothing_and_mixes_nothing(
    storm_server: Server, integration_repository: Path, protocol: str
) -> None:
    url = storm_server.url
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((INPUTS, 1, 40)).astype(np.float32)
    picks = rng.integers(0, INPUTS, REQUESTS)
    switches_before = metric(url, SWITCHES_METRIC, model="tiny")

    completed = threading.Semaphore(0)
    lock = threading.Lock()
    cursor = iter(range(REQUESTS))
    results: list[tuple[int, str, float, np.ndarray]] = []

    connect = _rest_call if protocol == "rest" else _grpc_call

    def worker() -> None:
        infer, client = connect(storm_server)
        try:
            while True:
                with lock:
                    n = next(cursor, None)
                if n is None:
                    return
                i = int(picks[n])
                record = (i, *infer(xs[i], n))
                with lock:
                    results.append(record)
                completed.release()
        finally:
            client.close()

    statuses: list[int] = []
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(worker) for _ in range(WORKERS)]
        # Spread the switches over the flow: one every REQUESTS / (SWITCHES + 1) responses.
        for s in range(SWITCHES):
            for _ in range(REQUESTS // (SWITCHES + 1)):
                assert completed.acquire(timeout=60), "requests stopped flowing"
            reply = httpx.put(
                f"{url}/admin/models/tiny/gate", json=GATES[s % len(GATES)], headers=AUTH
            )
            statuses.append(reply.status_code)
        for f in futures:
            f.result(timeout=120)  # re-raises the first failed request of a worker

    assert statuses == [200] * SWITCHES
    assert len(results) == REQUESTS
    assert metric(url, SWITCHES_METRIC, model="tiny") - switches_before == SWITCHES

    net = load_checkpoint(integration_repository / "tiny")
    references: dict[tuple[int, str, float], np.ndarray] = {}
    seen: set[tuple[str, float]] = set()
    for i, mode, keep, logits in results:
        key = (i, mode, keep)
        if key not in references:
            knobs = {} if mode == "dense" else {"keep_ratio": keep}
            references[key] = reference_logits(net, xs[i], mode, **knobs)[0]
        np.testing.assert_allclose(logits, references[key], atol=1e-4, err_msg=str(key))
        seen.add((mode, keep))
    # The storm really mixed configurations: every one of them served requests, and their
    # outputs differ enough that a response computed in another configuration would fail above.
    assert {"dense", "static", "dynamic"} <= {mode for mode, _ in seen}
    assert len(seen) >= len(GATES)
    for i in range(INPUTS):
        outs = [v for (j, _, _), v in references.items() if j == i]
        for a in range(len(outs)):
            for b in range(a):
                assert np.abs(outs[a] - outs[b]).max() > 1e-3

    restore = httpx.put(f"{url}/admin/models/tiny/gate", json={"mode": "dynamic"}, headers=AUTH)
    assert restore.status_code == 200
