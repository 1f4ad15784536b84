"""A retrofitted Hugging Face encoder against the ``transformers`` forward users run today.

    python benchmarks/hf_speed.py [--models bert-base hubert-base] [--batches 1 8]
                                  [--rounds 7] [--threads 2]

Both models are the ``transformers`` config defaults with random weights (random predictors:
each request keeps its own channel set): ``bert-base`` on 128 tokens, ``hubert-base`` on 2 s
of 16 kHz audio. Per batch size, one process times, interleaved round by round: the original
``transformers`` forward (eager, dense, the same weights), the retrofit's dense plan, and its
dynamic plans at keep 1.0 / 0.5 / 0.25. Realized speedup: dense plan time over dynamic time;
ideal: the dense MACs over the MACs the keep policy leaves (FFN channels kept + predictors,
everything else dense). Ratios are paired: the median over rounds of each round's own ratio
(the two forwards of a round run back to back, so a slow spell of a shared machine falls on
both); times are medians. Writes ``results/hf_speed_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from common import RESULTS

from models import GateSettings, compile_plan
from models.bench import cpu_name
from models.retrofit import retrofit
from models.sparse.kernels import time_once

KEEPS = (1.0, 0.5, 0.25)
GATES = {"use_dynamic_pruning": True, "dynamic_pruning_config": {"keep_ratio": 0.5, "bucket": 8}}


def _models(name: str) -> tuple[Any, dict[str, Any], int]:
    """(the transformers model, the config as retrofit takes it, the request length)."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "bert-base":
        config = tf.BertConfig(num_labels=2)
        return tf.BertForSequenceClassification(config).eval(), config.to_dict(), 128
    if name == "hubert-base":
        config = tf.HubertConfig(num_labels=2)
        return tf.HubertForSequenceClassification(config).eval(), config.to_dict(), 32000
    raise SystemExit(f"unknown model {name!r}: bert-base, hubert-base")


def bench(name: str, batches: list[int], rounds: int, log: Callable[[str], None]) -> list[dict]:
    original, config, length = _models(name)  # what users run
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:  # as a user retrofits: from a local folder
        original.save_pretrained(folder)
        net = retrofit(folder, GATES, max_length=length)
    log(f"{name}: retrofitted in {time.perf_counter() - start:.1f} s")
    cells = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        if name == "bert-base":
            x = torch.randint(1000, 30000, (batch, length), generator=gen)
            hf_inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
        else:
            x = torch.randn(batch, length, 1, generator=gen)
            hf_inputs = {"input_values": x[..., 0], "attention_mask": torch.ones(
                batch, length, dtype=torch.long)}
        lengths = torch.full((batch,), length)
        # Calibrate at the FFNs' own time resolution: an audio encoder's frames, not samples.
        steps = length
        if name != "bert-base":
            steps = int(original._get_feat_extract_output_lengths(torch.tensor(length)))
        start = time.perf_counter()
        plans = {"dense": compile_plan(net, GateSettings("dense"), calibrate=False)}
        for keep in KEEPS:
            settings = GateSettings("dynamic", keep_ratio=keep, bucket=8)
            plans[f"dynamic {keep:g}"] = compile_plan(net, settings, batch_sizes=[batch],
                                                      calib_length=steps)
        log(f"{name} batch {batch}: plans compiled in {time.perf_counter() - start:.1f} s")
        fns = {"transformers": partial(original, **hf_inputs)}
        fns.update({k: partial(p, x, lengths) for k, p in plans.items()})
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            for fn in fns.values():  # warm-up
                fn()
            order = list(fns)
            for r in range(rounds):
                for k in order[r % len(order):] + order[: r % len(order)]:
                    times[k].append(time_once(fns[k], torch.device("cpu")) * 1e3)
                log(f"  round {r + 1}/{rounds}: " + ", ".join(
                    f"{k} {times[k][-1]:.0f}" for k in order) + " ms")
            outs = {k: p(x, lengths) for k, p in plans.items()}
            want = original(**hf_inputs).logits
            # The keep policy's MACs: the reference forward's count of the kept channels (a plan
            # may run more: a threshold's bucket padding, or the union of a batch's sets).
            policy = {f"dynamic {keep:g}": net(x, lengths, GateSettings(
                "dynamic", keep_ratio=keep, bucket=8)).macs for keep in KEEPS}
        med = {k: statistics.median(v) for k, v in times.items()}

        def paired(num: str, den: str, times: dict[str, list[float]] = times) -> float:
            return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

        row = {
            "model": name, "batch": batch, "length": length,
            "transformers_ms": round(med["transformers"], 1),
            "dense_ms": round(med["dense"], 1),
            "dense_vs_transformers": round(paired("transformers", "dense"), 3),
            "dense_max_abs_diff": float((outs["dense"].logits - want).abs().max()),
            "rounds": rounds,
        }
        for keep in KEEPS:
            key = f"dynamic {keep:g}"
            ideal = float((outs[key].dense_macs / policy[key]).mean())
            realized = paired("dense", key)
            row[f"keep_{keep:g}"] = {
                "ms": round(med[key], 1), "realized_speedup": round(realized, 3),
                "realized_per_round": [round(a / b, 3) for a, b in zip(times["dense"], times[key],
                                                                         strict=True)],
                "ran_over_kept_macs": round(float((outs[key].macs / policy[key]).mean()), 3),
                "ideal_speedup": round(ideal, 3), "realized_over_ideal": round(realized / ideal, 3),
                "vs_transformers": round(paired("transformers", key), 3),
            }
        cells.append(row)
        log(json.dumps(row))
    return cells


def markdown(meta: dict[str, Any], cells: list[dict]) -> str:
    lines = [
        f"# Retrofitted encoders vs the `transformers` forward ({meta['device_name']})",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} "
        f"threads, {cells[0]['rounds']} interleaved rounds: times are medians, ratios the "
        "median of each round's own ratio; random weights and "
        "predictors (config defaults). Realized: dense plan / dynamic; ideal: dense MACs / "
        "MACs left by the keep policy; ran: the MACs the plan ran over those (above 1 where "
        "the union strategy ran a batch's union of kept channels).",
        "",
        "| model | batch | transformers ms | dense ms (×) | keep | dynamic ms | realized | ideal "
        "| realized/ideal | ran | vs transformers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        for keep in KEEPS:
            k = c[f"keep_{keep:g}"]
            lines.append(
                f"| {c['model']} | {c['batch']} | {c['transformers_ms']} | {c['dense_ms']} "
                f"({c['dense_vs_transformers']}×) | {keep:g} | {k['ms']} | "
                f"{k['realized_speedup']}× | {k['ideal_speedup']}× | {k['realized_over_ideal']} "
                f"| {k.get('ran_over_kept_macs', 1.0)} | {k['vs_transformers']}× |"
            )
    lines.append("")
    lines.append("Dense ×: the `transformers` time over the dense plan's (≥ 1: no slower).")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["bert-base", "hubert-base"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    def log(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    cells = [c for name in args.models for c in bench(name, args.batches, args.rounds, log)]
    out = RESULTS / "hf_speed_cpu.json"
    if out.is_file():  # keep the other models' cells of an earlier run
        kept = [c for c in json.loads(out.read_text())["cells"] if c["model"] not in args.models]
        cells = kept + cells
    meta = {
        "device": "cpu", "device_name": cpu_name(), "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "cells": cells},
                                                          indent=1) + "\n")
    text = markdown(meta, cells)
    (RESULTS / "hf_speed_cpu.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
