"""`gated evaluate` as a user runs it: one JSON object on stdout, clear errors on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from models import ModelConfig, build_network, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _gated(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_evaluate_json(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {
            "model": {"channels": 8, "hidden": 16, "num_blocks": 1},
            "dynamic_pruning_config": {"bucket": 2},
        }
    )
    save_checkpoint(build_network(cfg), tmp_path / "ckpt")
    proc = _gated(
        "evaluate",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--gate-mode",
        "dynamic",
        "--keep-ratio",
        "0.25",
        "--data-seed",
        "7",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["gate_mode"] == "dynamic" and result["keep_ratio"] == 0.25
    assert result["samples"] == 1000 and result["data_seed"] == 7
    assert 0.0 <= result["accuracy"] <= 1.0
    assert 0.2 < result["flops_ratio"] < 0.35  # 4 of 16 channels kept, plus stem, head, predictor
    assert result["active_channel_ratio"] == 0.25


def test_evaluate_errors_are_one_line(tmp_path: Path) -> None:
    proc = _gated("evaluate", "--checkpoint", str(tmp_path / "missing"), "--json")
    assert proc.returncode == 2
    assert "checkpoint directory not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = _gated("evaluate", "--keep-ratio", "1.5")
    assert proc.returncode == 2 and "keep_ratio: got 1.5" in proc.stderr


def test_bench_json_cells() -> None:
    """`gated bench --json` on a one-cell grid of the shipped conv: the issue's keys, the static
    bound beside them, and a sparse forward that matches the masked reference."""
    proc = _gated(
        "bench",
        "--models",
        "conv",
        "--batches",
        "2",
        "--keep-ratios",
        "0.5",
        "--repeats",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    cell = json.loads(line)
    for key in ("model", "batch", "keep_ratio", "dense_ms", "masked_ms", "sparse_ms"):
        assert key in cell
    assert (cell["model"], cell["batch"], cell["keep_ratio"]) == ("conv", 2, 0.5)
    assert abs(cell["speedup"] - cell["dense_ms"] / cell["sparse_ms"]) < 0.01
    assert 1.5 < cell["ideal_speedup"] < 2.5  # half the gated channels, predictor included
    assert 1.5 < cell["static_ideal_speedup"] < 2.5
    assert cell["static_ms"] > 0 and cell["max_abs_logit_diff"] < 1e-4
