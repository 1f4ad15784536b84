"""Dense vs masked-dense vs sparse forward time, per model, batch size and keep ratio.

    gated bench                  # markdown table on stdout (or benchmarks/sparse_bench.py)
    gated bench --json           # one JSON object per cell on stdout

Model forward only, inputs already on the device. Per cell (model, batch, keep ratio) it
times, interleaved in one process (the order rotates every repeat), the reference network in
``dense`` mode, the dense plan, the reference in ``dynamic`` mode (masked dense: the mask is
multiplied, nothing is saved) and the compiled dynamic plan (:mod:`models.sparse`), and reports
medians. ``dense_ms`` is the faster of the two dense runs, so that the speedup owes nothing to
how the baseline is written. ``ideal_speedup`` is dense MACs over the MACs of the kept
channels, predictor included (the keep policy's ideal, whatever strategy the plan picked).

Beside them runs the plan of ``static`` mode at the same keep ratio (``static_*``): the same
number of channels per layer, removed once at compile time, so no predictor, no selection and
no gather, just smaller contiguous matmuls. It is the ceiling of any per-request plan on this
machine: where the static plan's speedup falls short of its FLOPs ideal (attention and norms
run slower per MAC than the gated matmuls, smaller matmuls run slower per MAC than big ones),
the dynamic plan, which does the same matmuls and more, cannot reach it either.

Models: ``conv`` (``models/configs/mnist1d_conv.yaml``, the shipped checkpoint when present,
else random weights; T 40), ``transformer-base`` (the built-in transformer, d_model 256, FFN
1024, 4 layers, 4 heads, T 128, random weights) and ``stock-encoder``: a stock
``torch.nn.TransformerEncoder`` of the same widths (GELU, pre-LN, in a plain module with an input
projection and a pooled head) gated with ``models.attach_gates``. For it the cell also times the
stock module's own eval forward (its fused fast path on, no gates): ``stock_ms`` and
``speedup_vs_stock``. Writes ``sparse_<device>.{json,md}`` only into ``--out-dir`` when given
(``benchmarks/sparse_bench.py`` gives ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch
from torch import nn

from models import (
    GatedNetwork,
    GateSettings,
    ModelConfig,
    attach_gates,
    build_network,
    load_checkpoint,
)
from models.config import load_config
from models.sparse import compile_plan, time_once

ROOT = Path(__file__).resolve().parent.parent
CONV_CONFIG = ROOT / "models" / "configs" / "mnist1d_conv.yaml"
SHIPPED = ROOT / "models" / "pretrained" / "mnist1d-conv"

TRANSFORMER_BASE = {
    "name": "transformer",
    "in_channels": 1,
    "num_classes": 10,
    "max_length": 128,
    "d_model": 256,
    "ffn": 1024,
    "num_heads": 4,
    "num_layers": 4,
}
VARIANTS = ("dense_ref", "dense_plan", "masked", "sparse", "static")
MODELS = ("conv", "transformer-base", "stock-encoder")


class StockEncoder(nn.Module):
    """A stock ``nn.TransformerEncoder`` classifier of transformer-base's widths."""

    def __init__(self, d_model: int = 256, ffn: int = 1024, layers: int = 4, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(1, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            ffn,
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 1) -> (B, 10)
        logits: torch.Tensor = self.head(self.encoder(self.inp(x)).mean(1))
        return logits


def build_model(name: str, device: torch.device) -> tuple[GatedNetwork, int, str, nn.Module | None]:
    """(network in eval mode, sequence length, where the weights come from, the stock module
    it was attached from, if any)."""
    torch.manual_seed(0)
    if name == "conv":
        if (SHIPPED / "model.safetensors").is_file():
            return load_checkpoint(SHIPPED, device), 40, str(SHIPPED.relative_to(ROOT)), None
        return build_network(load_config(CONV_CONFIG)).to(device).eval(), 40, "random", None
    if name == "transformer-base":
        cfg = ModelConfig.model_validate({"model": TRANSFORMER_BASE})
        return build_network(cfg).to(device).eval(), 128, "random", None
    if name == "stock-encoder":
        stock = StockEncoder().to(device).eval()
        cfg = ModelConfig.model_validate(
            {"model": {"name": "models.bench:StockEncoder", "max_length": 128}}
        )
        net = attach_gates(copy.deepcopy(stock), cfg).to(device).eval()
        return net, 128, "random", stock
    raise SystemExit(f"unknown model {name!r}; use one of {', '.join(MODELS)}")


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    return lambda fn: time_once(fn, device) * 1e3


def predictor_flops_ratio(model: GatedNetwork, length: int) -> float:
    """Predictor MACs of all gated layers over the dense network's MACs, one request."""
    lengths = torch.tensor([length])
    pred = sum(float(g.predictor.macs(lengths)[0]) for _, g in model.dynamic_gates() if g.predictor)
    with torch.inference_mode():
        x = torch.zeros(1, length, model.config.model.in_channels, device=_device_of(model))
        dense = float(model(x, lengths.to(x.device), GateSettings("dense")).dense_macs[0])
    return pred / dense


def _device_of(model: GatedNetwork) -> torch.device:
    return next(model.parameters()).device


def bench_model(
    name: str,
    batches: Sequence[int],
    keep_ratios: Sequence[float],
    repeats: int,
    device: torch.device,
) -> list[dict[str, object]]:
    model, length, source, stock = build_model(name, device)
    bucket = model.config.dynamic_pruning_config.bucket
    timer = _timer(device)
    dense = GateSettings("dense")
    dense_plan = compile_plan(model, dense, calibrate=False)
    pred_ratio = predictor_flops_ratio(model, length)
    cells: list[dict[str, object]] = []
    for keep in keep_ratios:
        settings = GateSettings("dynamic", keep_ratio=keep, bucket=bucket)
        start = time.perf_counter()
        plan = compile_plan(model, settings, batch_sizes=batches, calib_length=length)
        compile_s = time.perf_counter() - start
        static = GateSettings("static", keep_ratio=keep, bucket=bucket)
        static_plan = compile_plan(model, static, calibrate=False)
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, length, model.config.model.in_channels, generator=gen)
            x = x.to(device)
            lengths = torch.full((batch,), length)  # engine-style: lengths stay on the host
            fns: dict[str, Callable[[], object]] = {
                "dense_ref": partial(model, x, lengths, dense),
                "dense_plan": partial(dense_plan, x, lengths),
                "masked": partial(model, x, lengths, settings),
                "sparse": partial(plan, x, lengths),
                "static": partial(static_plan, x, lengths),
            }
            if stock is not None:
                fns["stock"] = partial(stock, x)
            times: dict[str, list[float]] = {v: [] for v in fns}
            with torch.inference_mode():
                for _ in range(2):  # warm-up: allocator, kernel selection
                    for fn in fns.values():
                        fn()
                order = list(fns)
                # Small batches: more repeats in about the same time, for steadier medians.
                for rep in range(cell_repeats(repeats, batch)):
                    # Rotate the order so that no variant always runs right after the one
                    # that leaves the caches and the allocator in the worst state.
                    for v in order[rep % len(order) :] + order[: rep % len(order)]:
                        times[v].append(timer(fns[v]))
                out = plan(x, lengths)
                ref = model(x, lengths, settings)
                static_ref = model(x, lengths, static)
            med = {v: statistics.median(t) for v, t in times.items()}
            dense_ms = min(med["dense_ref"], med["dense_plan"])
            # The ideal is the keep policy's: MACs of the kept channels only (the reference
            # counts those), not what the plan chose to run.
            ideal = float((ref.dense_macs / ref.macs).mean())
            speedup = dense_ms / med["sparse"]
            static_ideal = float((static_ref.dense_macs / static_ref.macs).mean())
            static_speedup = dense_ms / med["static"]
            strategies = sorted(
                {
                    str(layer.strategy(batch, layer.k or 0))
                    for layer in plan.layers
                    if layer.k is not None and layer.k < layer.n_open
                }
            ) or ["dense"]
            extra: dict[str, object] = {}
            if stock is not None:
                extra = {
                    "stock_ms": round(med["stock"], 3),
                    "speedup_vs_stock": round(med["stock"] / med["sparse"], 3),
                    "dense_plan_vs_stock": round(med["stock"] / med["dense_plan"], 3),
                }
            cells.append(
                {
                    "model": name,
                    "batch": batch,
                    "keep_ratio": keep,
                    "dense_ms": round(dense_ms, 3),
                    "masked_ms": round(med["masked"], 3),
                    "sparse_ms": round(med["sparse"], 3),
                    "speedup": round(speedup, 3),
                    "ideal_speedup": round(ideal, 3),
                    "speedup_over_ideal": round(speedup / ideal, 3),
                    "dense_ref_ms": round(med["dense_ref"], 3),
                    "dense_plan_ms": round(med["dense_plan"], 3),
                    "masked_speedup": round(dense_ms / med["masked"], 3),
                    "static_ms": round(med["static"], 3),
                    "static_speedup": round(static_speedup, 3),
                    "static_ideal_speedup": round(static_ideal, 3),
                    "static_speedup_over_ideal": round(static_speedup / static_ideal, 3),
                    "max_abs_logit_diff": float((out.logits - ref.logits).abs().max()),
                    "predictor_flops_ratio": round(pred_ratio, 5),
                    "strategy": "+".join(strategies),
                    "compile_s": round(compile_s, 2),
                    "length": length,
                    "repeats": cell_repeats(repeats, batch),
                    "weights": source,
                    **extra,
                }
            )
    return cells


def cell_repeats(repeats: int, batch: int) -> int:
    """Interleaved repeats of a cell: ``repeats`` at batch 32 and above, more below."""
    return repeats * max(1, 32 // max(batch, 1))


def markdown(cells: Sequence[dict[str, object]], meta: dict[str, object]) -> str:
    lines = [
        f"Sparse forward on {meta['device_name']}, {meta['threads']} threads, torch "
        f"{meta['torch']}; medians of interleaved repeats ({meta['repeats']} × 32 / batch, at "
        f"least {meta['repeats']}); dynamic mode, "
        "keep ratio per request (top-k of the predictor's gates). Static bound: the static plan "
        "at the same keep ratio (no predictor, no gather), its speedup / its FLOPs ideal. "
        "Stock: the stock nn.TransformerEncoder's own eval forward (fast path), ms and the "
        "sparse plan's speedup over it.",
        "",
        "| model | batch | keep | dense ms | masked ms | sparse ms | speedup | ideal | "
        "speedup/ideal | static bound | strategy | stock ms / sparse vs stock |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        stock = f"{c['stock_ms']:.2f} / {c['speedup_vs_stock']:.2f}×" if "stock_ms" in c else "—"
        lines.append(
            f"| {c['model']} | {c['batch']} | {c['keep_ratio']} | {c['dense_ms']:.2f} | "
            f"{c['masked_ms']:.2f} | {c['sparse_ms']:.2f} | {c['speedup']:.2f}× | "
            f"{c['ideal_speedup']:.2f}× | {c['speedup_over_ideal']:.2f} | "
            f"{c['static_speedup']:.2f}× / {c['static_speedup_over_ideal']:.2f} | "
            f"{c['strategy']} | {stock} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument(
        "--repeats", type=int, default=15, help="repeats at batch ≥ 32; × 32/batch below"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--json", action="store_true", help="one JSON object per cell")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="write sparse_<device>.{json,md} here"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    meta: dict[str, object] = {
        "device": device.type,
        "device_name": device_name,
        "threads": args.threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    cells: list[dict[str, object]] = []
    for name in args.models:
        for cell in bench_model(name, args.batches, args.keep_ratios, args.repeats, device):
            cells.append(cell)
            if args.json:
                sys.stdout.write(json.dumps(cell) + "\n")
                sys.stdout.flush()
    table = markdown(cells, meta)
    if not args.json:
        sys.stdout.write(table)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.out_dir / f"sparse_{device.type}"
        stem.with_suffix(".json").write_text(json.dumps({**meta, "cells": cells}, indent=1))
        stem.with_suffix(".md").write_text(table)
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


if __name__ == "__main__":
    sys.exit(main())
