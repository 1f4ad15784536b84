"""Dynamic vs static gating at equal executed FLOPs on MNIST-1D, as means over seeds.

    python benchmarks/accuracy_study.py --seeds 0 1 2

For each seed it trains the config twice with the same recipe: as given (dynamic: the input
predictor picks the kept channels per request) and with ``use_input_gating: false`` (static:
one learned channel ranking for every input). Each model is then evaluated on the MNIST-1D
test split, and on a freshly generated split, at the largest kept-channel count whose executed
FLOPs ratio stays within each budget. Writes ``benchmarks/results/accuracy_mnist1d.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
from common import RESULTS

from models import GatedNetwork, GateSettings, load_checkpoint
from models.config import load_config
from models.data import load_mnist1d
from models.evaluate import evaluate
from models.train import train

logger = logging.getLogger("accuracy_study")


def kept_for_budget(model: GatedNetwork, mode: str, budget: float, sample: torch.Tensor) -> float:
    """Largest keep ratio (exact k, bucket 1) whose executed FLOPs ratio is <= ``budget``."""
    n_open = min(int((gate.static_values() > 0).sum()) for _, gate in model.dynamic_gates())
    lengths = torch.full((sample.shape[0],), sample.shape[1])
    for k in range(n_open, 0, -1):
        settings = GateSettings(mode, keep_ratio=k / n_open, bucket=1)  # type: ignore[arg-type]
        with torch.inference_mode():
            ratio = model(sample, lengths, settings).flops_ratio.max().item()
        if ratio <= budget:
            return k / n_open
    return 1.0 / n_open


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("models/configs/mnist1d_conv.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.375, 0.25, 0.15, 0.1])
    parser.add_argument("--fresh-data-seed", type=int, default=1234)
    parser.add_argument("--runs", type=Path, default=Path("runs/study"))
    parser.add_argument("--name", default="accuracy_mnist1d")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    base = load_config(args.config)
    variants = {
        "dynamic": base,
        "static": base.model_copy(
            update={
                "dynamic_pruning_config": base.dynamic_pruning_config.model_copy(
                    update={"use_input_gating": False}
                )
            }
        ),
    }
    splits = {
        "test": load_mnist1d(base.data.seed)[1],
        "fresh": load_mnist1d(args.fresh_data_seed)[1],
    }
    rows: list[dict[str, object]] = []
    for seed in args.seeds:
        for variant, cfg in variants.items():
            out = args.runs / f"{variant}-seed{seed}"
            if not (out / "model.safetensors").exists():
                logger.info("training %s seed %d", variant, seed)
                cfg = cfg.model_copy(
                    update={"training": cfg.training.model_copy(update={"seed": seed})}
                )
                train(cfg, out, progress=False)
            model = load_checkpoint(out)
            mode = "dynamic" if variant == "dynamic" else "static"
            for split_name, split in splits.items():
                dense = evaluate(model, split, GateSettings("dense"))
                rows.append(
                    {
                        "seed": seed,
                        "variant": variant,
                        "split": split_name,
                        "budget": 1.0,
                        "keep_ratio": 1.0,
                        "accuracy": dense.accuracy,
                        "flops_ratio": dense.flops_ratio,
                    }
                )
                for budget in args.budgets:
                    keep = kept_for_budget(model, mode, budget, split.x[:4])
                    r = evaluate(model, split, GateSettings(mode, keep_ratio=keep, bucket=1))  # type: ignore[arg-type]
                    rows.append(
                        {
                            "seed": seed,
                            "variant": variant,
                            "split": split_name,
                            "budget": budget,
                            "keep_ratio": keep,
                            "accuracy": r.accuracy,
                            "flops_ratio": r.flops_ratio,
                        }
                    )
            logger.info("%s seed %d done", variant, seed)

    summary = _summarise(rows, args.budgets)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"rows": rows, "summary": summary}, indent=1)
    )
    table = _markdown(summary, len(args.seeds))
    (RESULTS / f"{args.name}.md").write_text(table)
    sys.stdout.write(table)
    return 0


def _summarise(rows: list[dict], budgets: list[float]) -> list[dict[str, object]]:
    out = []
    for budget in [1.0, *budgets]:
        entry: dict[str, object] = {"budget": budget}
        for variant in ("dynamic", "static"):
            for split in ("test", "fresh"):
                sel = [
                    r
                    for r in rows
                    if r["variant"] == variant and r["split"] == split and r["budget"] == budget
                ]
                accs = [float(r["accuracy"]) for r in sel]
                entry[f"{variant}_{split}_mean"] = statistics.mean(accs)
                entry[f"{variant}_{split}_std"] = statistics.pstdev(accs)
                entry[f"{variant}_flops"] = statistics.mean(float(r["flops_ratio"]) for r in sel)
                entry[f"{variant}_keep"] = statistics.mean(float(r["keep_ratio"]) for r in sel)
        out.append(entry)
    return out


def _markdown(summary: list[dict], seeds: int) -> str:
    lines = [
        "| FLOPs budget | dynamic: FLOPs | dynamic: test acc | dynamic: fresh acc | static: FLOPs "
        "| static: test acc | static: fresh acc | dynamic − static (test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        label = "dense" if e["budget"] == 1.0 else f"≤ {e['budget']}"
        gap = (e["dynamic_test_mean"] - e["static_test_mean"]) * 100
        lines.append(
            f"| {label} | {e['dynamic_flops']:.3f} | {e['dynamic_test_mean']:.4f} ± "
            f"{e['dynamic_test_std']:.4f} | {e['dynamic_fresh_mean']:.4f} | "
            f"{e['static_flops']:.3f} | {e['static_test_mean']:.4f} ± {e['static_test_std']:.4f} | "
            f"{e['static_fresh_mean']:.4f} | {gap:+.2f} pt |"
        )
    lines.append(
        f"\nMeans ± population std over {seeds} training seeds; 1000 test sequences each.\n"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
