"""Strategy calibration: a short timing of each execution strategy per (batch size, k)."""

from __future__ import annotations

import statistics
from functools import partial

import torch

from models.sparse.executors import DENSE, FFNExecutor, Strategy
from models.sparse.kernels import time_once, without_onednn
from models.sparse.workspace import Workspace


def candidates(batch: int) -> list[Strategy]:
    chunks = sorted({1, *(c for c in (4, 8) if c < batch), batch})
    return [DENSE, *(Strategy("gather", c) for c in chunks)]


def calibrate(
    ex: FFNExecutor, batch: int, k: int, length: int, reps: int
) -> tuple[Strategy, dict[str, float]]:
    """Time each strategy of ``ex`` on random inputs of this shape; interleaved repeats,
    medians. Returns the fastest and every median (ms)."""
    dev = ex.b_out.device
    gen = torch.Generator(device="cpu").manual_seed(batch * 7919 + k)
    u = torch.randn(batch, length, ex.d_ins[0], generator=gen).to(dev)
    y0 = torch.randn(batch, length, ex.d_out, generator=gen).to(dev)
    y = y0.clone()
    scores = torch.rand(batch, ex.n_open, generator=gen).to(dev)
    values, idx = scores.topk(k, dim=-1)  # (B, k) open rows of the sides
    cands = candidates(batch)
    ws = Workspace()
    # Small batches run in well under a millisecond: more repeats for the same noise.
    reps = reps * max(1, 8 // batch)
    times: dict[Strategy, list[float]] = {s: [] for s in cands}
    with without_onednn():  # the kernels a plan runs
        for rep in range(reps + 1):
            for s in cands:
                y.copy_(y0)  # the kernels add into y in place
                t = time_once(partial(ex.run_for_timing, u, y, idx, values, s, ws), dev)
                if rep:  # the first round only warms up allocators and kernels
                    times[s].append(t)
    medians = {s: statistics.median(v) for s, v in times.items()}
    best = min(medians, key=lambda s: medians[s])
    return best, {str(s): round(v * 1e3, 4) for s, v in medians.items()}
