"""Accuracy of a retrofit: a `transformers` encoder trained dense, then gated with its base frozen.

    python benchmarks/retrofit_accuracy.py [--hf-config models/configs/mnist1d_wav2vec2_small.json]
        [--seeds 0 1 2] [--epochs 40] [--fit-epochs 10] [--reuse] [--ship DIR]

For each seed: a ``Wav2Vec2ForSequenceClassification`` (the config's size) is trained dense on
MNIST-1D's training split (raw signal as audio; AdamW, cross-entropy) and written with
``save_pretrained``: the user's pretrained model. Then, twice from that folder, ``retrofit``
gates every FFN with the gate keys of ``models/configs/mnist1d_wav2vec2_gates.yaml`` and
``fit`` trains with the base frozen, by distillation from the dense forward, on the same data
and budget (epochs, sampled keep ratios 1 / 0.5 / 0.25):

- dynamic: the predictors and the static gates;
- static: the static gates alone, no predictor (one channel subset for every input).

Both are evaluated on the test split and on a freshly generated one (another MNIST-1D seed):
dense, dynamic at keep 0.5 and 0.25 of the FFN channels, and static at the largest keep ratio
whose total FLOPs stay within the dynamic model's at that keep (predictor included). Writes
``results/retrofit_accuracy.{json,md}``; with ``--ship DIR`` also the first seed's fitted
dynamic checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import RESULTS, ROOT

from models import GatedNetwork, GateSettings, save_checkpoint
from models.data import Split, load_mnist1d
from models.fit import fit
from models.retrofit import retrofit

logger = logging.getLogger("retrofit_accuracy")
GATES = ROOT / "models" / "configs" / "mnist1d_wav2vec2_gates.yaml"
KEEPS = (0.5, 0.25)


def train_dense(config: dict[str, Any], train: Split, epochs: int, seed: int) -> Any:
    """The user's side: a plain ``transformers`` classifier trained on the signal."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config.from_dict(config))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    steps = epochs * -(-len(train) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(train), 128):
            idx = order[start : start + 128]
            logits = model(input_values=train.x[idx, :, 0]).logits
            loss = F.cross_entropy(logits, train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            logger.info("seed %d dense epoch %d/%d loss %.4f", seed, epoch + 1, epochs,
                        total / len(train))
    return model.eval()


def accuracy(net: GatedNetwork, split: Split, settings: GateSettings) -> tuple[float, float]:
    """(accuracy, mean total FLOPs ratio) on ``split``."""
    correct, flops = 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(split), 250):
            x, y = split.x[start : start + 250], split.y[start : start + 250]
            out = net(x, split.lengths[start : start + 250], settings)
            correct += int((out.logits.argmax(1) == y).sum())
            flops += float(out.flops_ratio.sum())
    return correct / len(split), flops / len(split)


def static_keep_within(net: GatedNetwork, split: Split, budget: float) -> float:
    """The largest static keep ratio (exact k) whose total FLOPs ratio is within ``budget``
    (FLOPs grow with k: a binary search)."""
    n = min(net.gated_widths().values())
    sample = Split(split.x[:16], split.y[:16], split.lengths[:16])

    def flops(k: int) -> float:
        return accuracy(net, sample, GateSettings("static", keep_ratio=k / n, bucket=1))[1]

    low, high = 1, n  # flops(low) is assumed within the budget
    while low < high:
        mid = (low + high + 1) // 2
        if flops(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low / n


def one_seed(args: argparse.Namespace, config: dict[str, Any], seed: int, splits: dict[str, Split],
             train: Split) -> dict[str, Any]:
    start = time.monotonic()
    folder = args.runs / args.hf_config.stem / f"seed{seed}-e{args.epochs}" / "pretrained"
    if not (args.reuse and (folder / "config.json").is_file()):
        hf = train_dense(config, train, args.epochs, seed)
        hf.save_pretrained(folder)
    trained_s = time.monotonic() - start
    nets = {}
    for variant in ("dynamic", "static"):
        net = retrofit(folder, GATES, max_length=40)
        fit(net, train, splits["test"], epochs=args.fit_epochs, keep_ratios=(1.0, 0.5, 0.25),
            static_gates=True, predictors=variant == "dynamic", seed=seed, progress=False)
        nets[variant] = net
    row: dict[str, Any] = {"seed": seed, "train_dense_s": round(trained_s, 1),
                           "total_s": round(time.monotonic() - start, 1)}
    for name, split in splits.items():
        cells: dict[str, Any] = {}
        cells["dense"] = accuracy(nets["dynamic"], split, GateSettings("dense"))
        for keep in KEEPS:
            dyn = accuracy(nets["dynamic"], split, GateSettings("dynamic", keep_ratio=keep,
                                                                bucket=1))
            static_keep = static_keep_within(nets["static"], split, dyn[1])
            st = accuracy(nets["static"], split, GateSettings("static", keep_ratio=static_keep,
                                                              bucket=1))
            cells[f"dynamic {keep:g}"] = dyn
            cells[f"static {keep:g}"] = (*st, static_keep)
        row[name] = cells
    logger.info("seed %d: %s", seed, json.dumps(row))
    if args.ship and seed == args.seeds[0]:
        save_checkpoint(nets["dynamic"], args.ship, metadata={
            "retrofit": {"source": "Wav2Vec2ForSequenceClassification trained on MNIST-1D",
                         "hf_config": str(args.hf_config.name), "seed": seed,
                         "dense_epochs": args.epochs, "fit_epochs": args.fit_epochs},
            "accuracy": {k: v for k, v in row.items() if k in splits}})
        logger.info("shipped checkpoint written to %s", args.ship)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def stat(split: str, key: str, i: int = 0) -> str:
        values = [r[split][key][i] for r in rows]
        mean = statistics.mean(values)
        sd = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * sd:.1f}"

    def mean(split: str, key: str, i: int) -> float:
        return statistics.mean(r[split][key][i] for r in rows)

    lines = [
        f"# Retrofit accuracy: {meta['model']} on MNIST-1D ({len(rows)} seeds)",
        "",
        f"Dense training {meta['epochs']} epochs, then gated with the base frozen and fitted "
        f"{meta['fit_epochs']} epochs by distillation (dynamic: predictors and static gates; "
        "static: static gates, no predictor). Accuracy in % (mean ± population std over "
        "seeds); FLOPs: total executed over dense, predictors included. Static runs at the "
        "largest keep ratio within the dynamic row's FLOPs.",
        "",
        "| split | FFN keep | dynamic acc | dynamic FLOPs | static acc | static keep | static "
        "FLOPs | dense acc | dynamic − dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split in ("test", "fresh"):
        dense = mean(split, "dense", 0)
        for keep in KEEPS:
            d, s = f"dynamic {keep:g}", f"static {keep:g}"
            lines.append(
                f"| {split} | {keep:g} | {stat(split, d)} | {mean(split, d, 1):.3f} | "
                f"{stat(split, s)} | {mean(split, s, 2):.3f} | {mean(split, s, 1):.3f} | "
                f"{stat(split, 'dense')} | {100 * (mean(split, d, 0) - dense):+.1f} pt |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-config", type=Path,
                   default=ROOT / "models" / "configs" / "mnist1d_wav2vec2_small.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--fit-epochs", type=int, default=10)
    p.add_argument("--fresh-data-seed", type=int, default=1234)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "retrofit")
    p.add_argument("--ship", type=Path, help="write the first seed's fitted checkpoint here")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a dense model this script trained before (same config, seed, "
                   "epochs) from --runs")
    p.add_argument("--name", default="retrofit_accuracy")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    config = json.loads(args.hf_config.read_text())
    train, test = load_mnist1d()
    _, fresh = load_mnist1d(args.fresh_data_seed)
    splits = {"test": test, "fresh": fresh}
    rows = [one_seed(args, config, seed, splits, train) for seed in args.seeds]
    meta = {"model": f"Wav2Vec2 ({args.hf_config.name})", "epochs": args.epochs,
            "fit_epochs": args.fit_epochs, "fresh_data_seed": args.fresh_data_seed,
            "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                          indent=1) + "\n")
    text = markdown(rows, meta)
    (RESULTS / f"{args.name}.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
