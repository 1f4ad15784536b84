"""A user's own networks over the real server: factories by import path, broken ones refused.

The factories live in ``tests/utils/factories.py`` (importable from the repository root, the
servers' working directory). Each served network is a plain ``nn.Module`` that the loader
gates with ``attach_gates``.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models import ModelConfig, build_network, save_checkpoint, settings_for
from tests.integration.conftest import ROOT, free_port, serving
from tests.utils.service import ADMIN_TOKEN, json_request

GATE = {"dynamic_pruning_config": {"bucket": 2, "keep_ratio": 0.5}}


def user_checkpoint(folder: Path, factory: str, seed: int = 0, **args: object) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate(
        {"model": {"name": factory, "max_length": 64, "args": args}, **GATE}
    )
    net = build_network(cfg).eval()
    with torch.no_grad():  # a predictor that ranks channels differently per request
        for _, gate in net.dynamic_gates():
            assert gate.predictor is not None
            for p in gate.predictor.parameters():
                p.normal_(0, 0.5)
    save_checkpoint(net, folder)
    return folder


def broken_folder(folder: Path, factory: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model:\n  name: {factory}\n")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


BROKEN = [
    ("tests.utils.absent:build", "cannot import 'tests.utils.absent:build': ModuleNotFoundError"),
    ("tests.utils.factories:raising", "raised ValueError: no weights for you"),
    ("tests.utils.factories:wrong_type", "returned int, not a torch.nn.Module"),
]


@pytest.mark.parametrize(("factory", "cause"), BROKEN, ids=["import", "raises", "type"])
def test_broken_factory_stops_serve_with_one_line(tmp_path: Path, factory: str, cause: str) -> None:
    repo = tmp_path / "repo"
    broken_folder(repo / "broken", factory)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--model-repository",
            str(repo),
            "--port",
            str(free_port()),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "model 'broken'" in lines[0] and cause in lines[0]


def _infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    reply = httpx.post(f"{url}/v2/models/{model}/infer", json=json_request(x), timeout=30.0)
    assert reply.status_code == 200, reply.text
    out = reply.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _reference(folder: Path, x: np.ndarray) -> np.ndarray:
    from models import load_checkpoint

    net = load_checkpoint(folder)
    with torch.inference_mode():
        out = net(
            torch.from_numpy(x[:, :, None].copy()),
            torch.full((x.shape[0],), x.shape[1]),
            settings_for(net.config, "dynamic"),
        )
    return out.logits.numpy()


def test_user_networks_serve_and_a_broken_hot_load_is_a_4xx(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    user = user_checkpoint(repo / "user", "tests.utils.factories:tiny_user", width=8, hidden=16)
    enc = user_checkpoint(repo / "encoder", "tests.utils.factories:tiny_encoder", seed=1)
    rng = np.random.default_rng(0)
    requests = [rng.standard_normal((1, n)).astype(np.float32) for n in (5, 40, 17, 40, 9, 33) * 4]
    with serving(
        repo, tmp_path, admin_token=ADMIN_TOKEN, max_batch_size=8, max_queue_delay_ms=20
    ) as server:
        meta = httpx.get(f"{server.url}/v2/models/user", timeout=10).json()
        assert meta["inputs"][0]["name"] == "input"
        for model, folder in (("user", user), ("encoder", enc)):
            # Concurrent requests of mixed lengths share batches (the encoder, whose forward
            # takes no lengths, only with requests of its own length); each result is its solo
            # forward's.
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda x, m=model: _infer(server.url, m, x), requests))
            for x, logits in zip(requests, got, strict=True):
                np.testing.assert_allclose(logits, _reference(folder, x), atol=1e-4)
        broken_folder(repo / "broken", "tests.utils.factories:raising")
        reply = httpx.post(
            f"{server.url}/v2/repository/models/broken/load",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )
        assert reply.status_code == 400, reply.text  # it exists but does not load
        assert "broken" in reply.json()["error"] and "no weights for you" in reply.json()["error"]
        np.testing.assert_allclose(
            _infer(server.url, "user", requests[0]), _reference(user, requests[0]), atol=1e-4
        )
