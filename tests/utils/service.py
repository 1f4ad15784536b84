"""Helpers shared by the service tests: tiny model repositories and request bodies."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from models import GatedNetwork, ModelConfig, build_network, save_checkpoint

ADMIN_TOKEN = "test-admin-token-0123456789"
TINY_MAX_LENGTH = 64


def tiny_network(seed: int = 0, in_channels: int = 1) -> GatedNetwork:
    """A tiny conv network whose static gates close a few channels (so modes differ)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate(
        {
            "model": {
                "channels": 8, "hidden": 16, "num_blocks": 2, "in_channels": in_channels,
                "max_length": TINY_MAX_LENGTH,
            },
            "dynamic_pruning_config": {"bucket": 2, "keep_ratio": 0.5},
        }
    )
    net = build_network(cfg).eval()
    for gate in net.static_gates():
        next(gate.parameters()).data[::5] = -10.0
    return net


def make_repository(root: Path, names: tuple[str, ...] = ("tiny",)) -> Path:
    """A model repository with one tiny checkpoint per name (different seeds)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        save_checkpoint(tiny_network(seed=i), root / name)
    return root


def json_request(x: np.ndarray, **parameters: object) -> dict[str, object]:
    """A V2 JSON inference request for input `x`."""
    body: dict[str, object] = {
        "inputs": [
            {
                "name": "input", "shape": list(x.shape), "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    if parameters:
        body["parameters"] = parameters
    return body


def binary_request(x: np.ndarray, **parameters: object) -> tuple[bytes, dict[str, str]]:
    """A V2 binary-tensor request for input `x`, asking for binary outputs: (body, headers)."""
    import orjson

    params: dict[str, object] = {"binary_data_output": True, **parameters}
    header = orjson.dumps(
        {
            "parameters": params,
            "inputs": [
                {
                    "name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
        }
    )
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def reference_logits(
    net: GatedNetwork, x: np.ndarray, mode: str = "dynamic", **knobs: float | None
) -> np.ndarray:
    """The model's own forward on `x` ((B, T) or (B, T, C)) with true lengths."""
    from models import settings_for

    arr = x if x.ndim == 3 else x[:, :, None]
    settings = settings_for(net.config, mode, **knobs)  # type: ignore[arg-type]
    with torch.inference_mode():
        out = net(
            torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)),
            torch.full((arr.shape[0],), arr.shape[1], dtype=torch.int64),
            settings,
        )
    return out.logits.numpy()


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` at ``url``/metrics whose labels include ``labels``; 0 when
    there is none."""
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    return sum(
        (
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ),
        0.0,
    )
