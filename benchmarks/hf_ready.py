"""How long a retrofitted ``bert-base`` takes to be ready to serve, and what it holds in memory.

    python benchmarks/hf_ready.py [--max-length 128] [--rows 8]

Builds ``bert-base`` (the ``transformers`` config defaults, random weights, a 2-label head) and
writes it with ``save_pretrained``; ``gated retrofit`` gates it (``--max-length`` tokens) and a
``serving.yaml`` gives it its own warm-up bounds (``--rows`` rows per forward, requests per
batch and rows per request). Then ``gated serve`` on that repository is timed from the
process start to ``/v2/health/ready`` (loaded, every plan compiled and calibrated, every plan
warmed up at ``rows`` × ``max_length``), one request of ``max_length`` INT64 ids is answered,
and the server's resident memory is read beside that of a plain ``transformers`` process that
loads the same folder and runs one forward at the same batch. Writes
``results/hf_ready_cpu[_keep_…].{json,md}``. ``--keep-ratios`` narrows the model's served
keep ratios in its ``serving.yaml`` (fewer static plans, less memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT

from models.bench import cpu_name
from service.local import start_server

PYTHON = sys.executable
REFERENCE = """
import sys, torch, transformers as tf
torch.set_num_threads(1)
model = tf.BertForSequenceClassification.from_pretrained(sys.argv[1], local_files_only=True)
with torch.inference_mode():
    model(input_ids=torch.ones(int(sys.argv[2]), int(sys.argv[3]), dtype=torch.long))
status = open("/proc/self/status").read()
print(status.split("VmRSS:")[1].split()[0], status.split("VmHWM:")[1].split()[0])
"""


def _memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB: resident now, and its peak."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"VmRSS:\s+(\d+)", status)
    hwm = re.search(r"VmHWM:\s+(\d+)", status)
    assert rss is not None and hwm is not None
    return int(rss.group(1)), int(hwm.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--keep-ratios", type=float, nargs="+",
                   help="the model's own keep ratios in its serving.yaml (default: the server's)")
    args = p.parse_args()
    import torch
    import transformers as tf

    def log(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        start = time.monotonic()
        tf.BertForSequenceClassification(tf.BertConfig(num_labels=2)).save_pretrained(root / "src")
        log(f"bert-base written in {time.monotonic() - start:.1f} s")
        start = time.monotonic()
        subprocess.run([PYTHON, "-m", "service.cli", "retrofit", str(root / "src"),
                        "--max-length", str(args.max_length), "--out",
                        str(root / "repo" / "bert-base")], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        retrofit_s = time.monotonic() - start
        log(f"retrofitted in {retrofit_s:.1f} s")
        serving: dict[str, object] = {"max_batch_rows": args.rows, "max_batch_size": args.rows,
                                      "max_request_rows": args.rows}
        if args.keep_ratios:
            serving["keep_ratios"] = list(args.keep_ratios)
        (root / "repo" / "bert-base" / "serving.yaml").write_text(
            "".join(f"{k}: {v}\n" for k, v in serving.items()))
        start = time.monotonic()
        server = start_server(root / "repo", root / "server.log", {"grpc_port": 0},
                              ready_timeout_s=600)
        ready_s = time.monotonic() - start
        log(f"ready in {ready_s:.1f} s")
        try:
            import tritonclient.http as http

            client = http.InferenceServerClient(server.address)
            ids = np.random.default_rng(0).integers(1000, 30000, (1, args.max_length))
            inp = http.InferInput("input_ids", list(ids.shape), "INT64")
            inp.set_data_from_numpy(ids.astype(np.int64))
            start = time.monotonic()
            logits = client.infer("bert-base", [inp], parameters={"keep_ratio": 0.5})
            first_ms = (time.monotonic() - start) * 1e3
            assert logits.as_numpy("logits").shape == (1, 2)
            client.close()
            rss, hwm = _memory_kib(server.process.pid)
            log_lines = [line for line in server.output().splitlines()
                         if "compiled" in line or "warmed up" in line or "ready:" in line]
        finally:
            code = server.stop()
        ref = subprocess.run([PYTHON, "-c", REFERENCE, str(root / "src"), str(args.rows),
                              str(args.max_length)], check=True, capture_output=True, text=True)
        ref_rss, ref_hwm = (int(v) for v in ref.stdout.split())
        weights_mib = sum(f.stat().st_size for f in (root / "src").glob("*.safetensors")) / 2**20
    result = {
        "device": "cpu", "device_name": cpu_name(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": tf.__version__,
        "model": f"bert-base (BertConfig defaults, random weights), max_length {args.max_length}",
        "serving_yaml": serving,
        "retrofit_s": round(retrofit_s, 1),
        "ready_s": round(ready_s, 1),
        "first_request_ms": round(first_ms, 1),
        "server_log": [re.sub(r"^\S+ \S+ ", "", line) for line in log_lines],
        "server_rss_mib": round(rss / 1024), "server_peak_rss_mib": round(hwm / 1024),
        "transformers_rss_mib": round(ref_rss / 1024),
        "transformers_peak_rss_mib": round(ref_hwm / 1024),
        "weights_file_mib": round(weights_mib),
        "server_exit_code": code,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "hf_ready_cpu" + ("_keep_" + "_".join(f"{r:g}" for r in args.keep_ratios)
                             if args.keep_ratios else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = (
        f"# A retrofitted bert-base: ready time and memory ({result['device_name']}, "
        f"{result['cpus']} CPUs)\n\n"
        f"- serving.yaml: {serving}; max_length {args.max_length}\n"
        f"- `gated retrofit`: {result['retrofit_s']} s\n"
        f"- `gated serve` to ready (load, compile and calibrate every plan, warm up): "
        f"**{result['ready_s']} s**; first request {result['first_request_ms']} ms\n"
        f"- resident memory: server {result['server_rss_mib']} MiB (peak "
        f"{result['server_peak_rss_mib']}); the `transformers` model alone, one forward at "
        f"[{args.rows}, {args.max_length}]: {result['transformers_rss_mib']} MiB (peak "
        f"{result['transformers_peak_rss_mib']}); weights file {result['weights_file_mib']} MiB\n"
    ) + "".join(f"    {line}\n" for line in result["server_log"])
    (RESULTS / f"{stem}.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
