"""Where the time of one gated FFN layer goes: dense vs the sparse plan, phase by phase.

    python benchmarks/sparse_breakdown.py [--batches 1 8 32] [--keep 0.5] [--repeats 25]

Model: ``transformer-base`` of ``gated bench`` (d_model 256, FFN 1024, T 128, random weights),
its first encoder layer, on CPU with 2 threads. The sparse side runs the kernels the compiled
plan runs for that batch size (the strategy its calibration picks), phase by phase: predictor,
selection (blend + top-k), weight and bias gather, first matmul and GELU (one call per request,
two phases in the batched strategy), gate scaling, second matmul; the dense side runs the dense
plan's first matmul with its GELU and the second matmul. ``layer`` is the
plan's own, un-instrumented call of the whole layer, so the phases can be checked against it.
Before every measurement the other layers' packed weights are read once, so this layer's
weights are as cold as in a real forward, and the layer's input is computed by its LayerNorm,
so it is as warm. Medians of interleaved repeats, milliseconds. Results go to
``benchmarks/results/sparse_breakdown_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import RESULTS

from models.bench import build_model
from models.gates import GateSettings
from models.layers import Forward
from models.sparse import SparsePlan, Workspace, addmm_act, compile_plan, without_onednn


def _phases_sparse(plan: SparsePlan, f: torch.Tensor, fwd: Forward) -> dict[str, float]:
    layer = plan.layers[0]
    assert layer.predictor is not None and layer.sides is not None and layer.k is not None
    b, t, _ = f.shape
    x = torch.zeros_like(f)
    ws: Workspace = plan._ws
    w_in, w_out = layer.sides[0], layer.sides[-1]
    step_weights = fwd.mask_at(t, layer.name)[3]
    strategy = layer.strategy(b, layer.k)
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + (now - clock) * 1e3
        clock = now

    dynamic = layer.predictor(f, step_weights, ws)
    tick("predictor")
    final = torch.addcmul(layer.static_part, dynamic, layer.weighted_static)  # type: ignore[arg-type]
    values, idx = final.topk(layer.k, dim=-1, sorted=False)
    tick("select")
    if strategy.kind != "gather":
        layer.run_for_timing(f, x, idx, values, strategy, ws)
        tick("dense fallback")
        return times
    k = layer.k
    bias = ws.get("bk", (b, k), x)
    torch.index_select(layer.b_in_all[0], 0, idx.reshape(-1), out=bias.view(-1))
    tick("gather")
    if strategy.chunk <= 1:  # per request: matmul and GELU are one call, as in the plan
        for i in range(b):
            g_in = torch.index_select(w_in, 0, idx[i], out=ws.get("g0", (k, w_in.shape[1]), x))
            g_out = torch.index_select(w_out, 0, idx[i],
                                       out=ws.get("g1", (k, w_out.shape[1]), x))
            tick("gather")
            h = ws.get("hk", (t, k), x)
            addmm_act(bias[i], f[i], g_in.t(), h, "gelu")
            tick("matmul 1 + GELU")
            h.mul_(values[i])
            tick("scale")
            x[i].addmm_(h, g_out)
            tick("matmul 2")
        return times
    for s in range(0, b, strategy.chunk):
        e = min(b, s + strategy.chunk)
        rows = idx[s:e].reshape(-1)
        g_in = ws.get("g0", (e - s, k, w_in.shape[1]), x)
        torch.index_select(w_in, 0, rows, out=g_in.view(-1, w_in.shape[1]))
        g_out = ws.get("g1", (e - s, k, w_out.shape[1]), x)
        torch.index_select(w_out, 0, rows, out=g_out.view(-1, w_out.shape[1]))
        tick("gather")
        h = ws.get("hk", (e - s, t, k), x)
        torch.baddbmm(bias[s:e].unsqueeze(1), f[s:e], g_in.transpose(1, 2), out=h)
        tick("matmul 1")
        torch.ops.aten.gelu_(h)
        tick("GELU")
        h.mul_(values[s:e].unsqueeze(1))
        tick("scale")
        x[s:e].baddbmm_(h, g_out)
        tick("matmul 2")
    return times


def _phases_dense(plan: SparsePlan, f: torch.Tensor) -> dict[str, float]:
    ex = plan.layers[0]
    b, t, _ = f.shape
    x = torch.zeros_like(f)
    h = torch.empty(b * t, ex.width)
    start = time.perf_counter()
    addmm_act(ex.b_in[0], f.reshape(b * t, -1), ex.w_in[0].t(), h, "gelu")
    t1 = time.perf_counter()
    x.view(b * t, -1).addmm_(h, ex.w_out_t)
    t2 = time.perf_counter()
    return {"matmul 1 + GELU": (t1 - start) * 1e3, "matmul 2": (t2 - t1) * 1e3}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def breakdown(batch: int, keep: float, repeats: int) -> dict[str, object]:
    model, length, _, _ = build_model("transformer-base", torch.device("cpu"))
    bucket = model.config.dynamic_pruning_config.bucket
    dense = compile_plan(model, GateSettings("dense"), calibrate=False)
    sparse = compile_plan(
        model,
        GateSettings("dynamic", keep_ratio=keep, bucket=bucket),
        batch_sizes=[batch],
        calib_length=length,
    )
    gen = torch.Generator().manual_seed(batch)
    residual = torch.randn(batch, length, 256, generator=gen)
    norm = model.layers[0].norm2  # type: ignore[index]
    x = torch.zeros(batch, length, 1)
    lengths = torch.full((batch,), length)
    others = [w for ex in sparse.layers[1:] if ex.sides is not None for w in ex.sides]
    runs: dict[str, list[dict[str, float]]] = {"dense": [], "sparse": []}
    with without_onednn(), torch.inference_mode():
        ctx_s = model.open_forward(x, lengths, sparse.settings, sparse)
        ctx_d = model.open_forward(x, lengths, dense.settings, dense)
        for rep in range(repeats + 2):
            for side in ("dense", "sparse"):
                plan = dense if side == "dense" else sparse
                ctx = ctx_d if side == "dense" else ctx_s
                phases: dict[str, float] = {}
                for timed in ("phases", "layer"):
                    for w in others:  # this layer's weights as cold as in a forward
                        w.sum()
                    f = norm(residual)  # fresh in cache, as right after the layer's norm
                    if timed == "layer":
                        out = torch.zeros_like(f)
                        phases["layer"] = _timed(
                            partial(plan.layers[0].fused, f, out, ctx, plan._ws, True)
                        )
                    elif side == "dense":
                        phases.update(_phases_dense(dense, f))
                    else:
                        phases.update(_phases_sparse(sparse, f, ctx))
                if rep >= 2:  # two warm-up rounds
                    runs[side].append(phases)
    layer0 = sparse.layers[0]
    return {
        "batch": batch,
        "keep_ratio": keep,
        "k": layer0.k,
        "strategy": str(layer0.strategy(batch, layer0.k or 0)),
        **{
            side: {p: round(statistics.median(r[p] for r in rs), 4) for p in rs[0]}
            for side, rs in runs.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cells = []
    for batch in args.batches:
        cell = breakdown(batch, args.keep, args.repeats)
        sys.stdout.write(json.dumps(cell) + "\n")
        sys.stdout.flush()
        cells.append(cell)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "sparse_breakdown_cpu.json"
    out.write_text(
        json.dumps(
            {
                "model": "transformer-base, layer 0 FFN",
                "threads": 2,
                "unit": "ms, medians",
                "cells": cells,
            },
            indent=2,
        )
        + "\n"
    )
    sys.stderr.write(f"wrote {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
