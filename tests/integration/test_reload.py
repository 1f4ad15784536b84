"""Hot reload through the model repository API on a real server, under load.

``POST /v2/repository/models/{m}/load`` swaps in the checkpoint now in the repository while
requests flow: none may fail, and answers after the swap must equal the new checkpoint's own
forward. Unload makes the model 404; load/unload cycles must not leak memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from models import save_checkpoint
from tests.integration.conftest import Server, serving
from tests.utils.service import (
    ADMIN_TOKEN,
    json_request,
    make_repository,
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


def test_hot_reload_under_load_swaps_weights_without_failures(
    reload_server: Server, repository: Path
) -> None:
    infer_url = f"{reload_server.url}/v2/models/tiny/infer"
    old = reference_logits(tiny_network(seed=0), X)
    new_net = tiny_network(seed=7)
    new = reference_logits(new_net, X)
    assert not np.allclose(old, new, atol=1e-3)
    save_checkpoint(new_net, repository / "tiny")

    failures: list[str] = []
    answers: list[np.ndarray] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=15.0) as c:
            while not stop.is_set():
                r = c.post(infer_url, content=BODY)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    answers.append(_logits(r))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(answers) < 20 and not failures:  # clients are flowing before the swap
            time.sleep(0.01)
        loaded = httpx.post(
            f"{reload_server.url}/v2/repository/models/tiny/load", headers=AUTH, timeout=15.0
        )
        # Then let some requests run on the new weights before stopping the clients.
        wanted, deadline = len(answers) + 20, time.monotonic() + 10.0
        while len(answers) < wanted and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(20.0)
    assert loaded.status_code == 200, loaded.text
    assert not failures, failures[:5]
    assert any(np.allclose(a, old, atol=1e-4) for a in answers)  # the swap happened under load
    for logits in answers:  # every answer comes from one set of weights or the other
        assert np.allclose(logits, old, atol=1e-4) or np.allclose(logits, new, atol=1e-4)
    after = httpx.post(infer_url, content=BODY, timeout=15.0)
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
