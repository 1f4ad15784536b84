"""Memory of oneDNN's kernel cache over requests of ever new lengths.

    python benchmarks/onednn_cache.py [--calls 400] [--capacity 32]

oneDNN compiles and caches a kernel per input shape. This runs HuBERT's convolutional front end
(the ``transformers`` config defaults, random weights, one thread) on random lengths of
0.5–3 s of 16 kHz audio, in three fresh processes: oneDNN off, oneDNN with the cache bounded as
``models.sparse`` bounds it, and oneDNN with its default capacity; it prints each process's
resident-memory growth after every hundred calls and writes ``results/onednn_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import RESULTS

CHILD = """
import os, random, sys
calls, mode, capacity = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if capacity:
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
import torch, transformers as tf
torch.set_num_threads(1)
torch.manual_seed(0)
random.seed(0)
torch.backends.mkldnn.enabled = mode != "off"
front = tf.HubertModel(tf.HubertConfig(num_hidden_layers=1)).eval().feature_extractor
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
marks = []
with torch.inference_mode():
    front(torch.randn(1, 48000))
    start = rss()
    for i in range(1, calls + 1):
        front(torch.randn(1, random.randint(8000, 48000)))
        if i % 100 == 0:
            marks.append(round(rss() - start, 1))
print(marks)
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--capacity", type=int, default=32, help="the bounded run's capacity")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    runs = {"oneDNN off": ("off", ""), f"oneDNN, capacity {args.capacity}": (
        "on", str(args.capacity)), "oneDNN, default capacity": ("on", "")}
    result = {}
    for name, (mode, capacity) in runs.items():
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.calls), mode, capacity],
            env=env, capture_output=True, text=True, check=True,
        ).stdout
        result[name] = json.loads(out.strip().splitlines()[-1])
        sys.stdout.write(f"{name}: RSS growth (MiB) after each 100 calls: {result[name]}\n")
        sys.stdout.flush()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onednn_cache.json").write_text(json.dumps(
        {"calls": args.calls, "rss_growth_mib_per_100_calls": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
