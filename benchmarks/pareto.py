"""Accuracy against executed FLOPs and measured latency: dense, static and dynamic gating.

    python benchmarks/pareto.py [--checkpoint models/pretrained/mnist1d-conv]

For the checkpoint's MNIST-1D test split, each point is one gate setting run through its
compiled sparse plan (:mod:`models.sparse`): dense; static at several keep ratios (one learned
channel ranking for every input, closed channels removed once); dynamic at the same keep
ratios (the predictor picks each request's channels). Accuracy and FLOPs come from the whole
split (FLOPs of the kept channels, the keep policy's cost; the FLOPs the plan executed are
recorded beside them); latency is the median forward time of a batch of ``--batch`` test
sequences (CPU, ``--threads`` threads). Writes ``benchmarks/results/pareto.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import MODEL, RESULTS, SHIPPED

from models import GateSettings, load_checkpoint
from models.data import load_mnist1d
from models.sparse import SparsePlan, compile_plan


def accuracy(
    plan: SparsePlan, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor
) -> tuple[float, float, float]:
    """(accuracy, FLOPs ratio of the kept channels, FLOPs ratio the plan executed) of ``plan``
    over a whole split, FLOPs ratios averaged over requests.

    The two ratios differ where the plan's calibration picked the dense fallback (every open
    channel computed, the closed ones multiplied by zero) because it was faster on this machine;
    the curve plots the first, the keep policy's cost, so that it does not move with that pick.
    """
    correct, kept_ratios, ran_ratios = 0, [], []
    with torch.inference_mode():
        for s in range(0, len(y), 500):
            seq = lengths[s : s + 500]
            out = plan(x[s : s + 500], seq)
            correct += int((out.logits.argmax(-1) == y[s : s + 500]).sum())
            # The masked reference counts the kept channels only: the keep policy's cost.
            policy = plan.model(x[s : s + 500], seq, plan.settings).macs
            kept_ratios.append(policy / out.dense_macs)
            ran_ratios.append(out.flops_ratio)
    return (
        correct / len(y),
        float(torch.cat(kept_ratios).mean()),
        float(torch.cat(ran_ratios).mean()),
    )


def latencies(
    plans: Sequence[SparsePlan], x: torch.Tensor, lengths: torch.Tensor, repeats: int
) -> list[float]:
    """Median ms per forward of each plan on one batch; repeats interleaved across plans."""
    times: list[list[float]] = [[] for _ in plans]
    with torch.inference_mode():
        for rep in range(repeats + 2):
            for plan, t in zip(plans, times, strict=True):
                start = time.perf_counter()
                plan(x, lengths)
                if rep >= 2:  # two warm-up rounds
                    t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def plot(points: Sequence[dict[str, object]], out: Path, title: str, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles = {"dense": ("k", "*"), "static": ("tab:blue", "o"), "dynamic": ("tab:orange", "s")}
    for mode, (color, marker) in styles.items():
        pts = [p for p in points if p["mode"] == mode]
        for ax, key in zip(axes, ("flops_ratio", "latency_ms"), strict=True):
            ax.plot(
                [p[key] for p in pts],
                [p["accuracy"] for p in pts],
                color=color,
                marker=marker,
                label=mode,
                linestyle="-" if len(pts) > 1 else "none",
            )
            for p in pts:
                if p["keep_ratio"] is not None:
                    ax.annotate(
                        f"{p['keep_ratio']:g}",
                        (p[key], p["accuracy"]),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize=7,
                        color=color,
                    )
    axes[0].set_xlabel("FLOPs of the kept channels / dense FLOPs")
    axes[1].set_xlabel(f"latency of a batch of {batch}, ms (CPU)")
    axes[0].set_ylabel("test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED / MODEL)
    parser.add_argument(
        "--static-checkpoint",
        type=Path,
        default=None,
        help="model trained for static gating (use_input_gating: false) for the static curve; "
        "default: --checkpoint, whose static ranking was never trained when it has a predictor",
    )
    parser.add_argument(
        "--keep-ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.375, 0.25, 0.125]
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.yaml").is_file():
        sys.stderr.write(f"{args.checkpoint}: no checkpoint; train it with `make train-shipped`\n")
        return 2
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    static_model = load_checkpoint(args.static_checkpoint) if args.static_checkpoint else model
    _, test = load_mnist1d(model.config.data.seed)
    bucket = model.config.dynamic_pruning_config.bucket
    settings = [GateSettings("dense")]
    for mode in ("static", "dynamic"):
        settings += [GateSettings(mode, keep_ratio=r, bucket=bucket) for r in args.keep_ratios]
    plans = [
        compile_plan(
            static_model if s.mode == "static" else model,
            s,
            batch_sizes=(args.batch,),
            calib_length=test.x.shape[1],
        )
        for s in settings
    ]
    ms = latencies(plans, test.x[: args.batch], test.lengths[: args.batch], args.repeats)
    points: list[dict[str, object]] = []
    for s, plan, latency in zip(settings, plans, ms, strict=True):
        acc, flops, executed = accuracy(plan, test.x, test.y, test.lengths)
        point = {
            "mode": s.mode,
            "keep_ratio": s.keep_ratio,
            "accuracy": acc,
            "flops_ratio": flops,
            "executed_flops_ratio": executed,
            "latency_ms": latency,
        }
        points.append(point)
        sys.stdout.write(json.dumps(point) + "\n")
    by_key = {(p["mode"], p["keep_ratio"]): p for p in points}
    gaps = {
        str(r): round(
            float(by_key[("dynamic", r)]["accuracy"]) - float(by_key[("static", r)]["accuracy"]),
            4,
        )
        for r in args.keep_ratios
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "checkpoint": str(args.checkpoint),
        "static_checkpoint": str(args.static_checkpoint or args.checkpoint),
        "split": f"mnist1d test (seed {model.config.data.seed}, {len(test)} sequences)",
        "batch": args.batch,
        "threads": args.threads,
        "dynamic_minus_static_accuracy": gaps,
        "points": points,
    }
    (args.out_dir / "pareto.json").write_text(json.dumps(summary, indent=1))
    title = f"{args.checkpoint.name}: MNIST-1D test accuracy vs cost"
    if args.static_checkpoint:
        title += f" (static curve: {args.static_checkpoint.name}, trained without predictor)"
    plot(points, args.out_dir / "pareto.png", title, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
