"""Base-size encoders through the server, beside PyTriton serving the same folders.

    python benchmarks/peer_bench.py --peer-python .peer-venv/bin/python
        [--loads bert128 bertmix hubert] [--concurrency 1 8 32] [--seconds 12] [--rounds 2]
        [--modes triton dense 0.5 0.25] [--work DIR]

The peer runs in its own virtual environment (``nvidia-pytriton`` pins numpy < 2)::

    python3.11 -m venv .peer-venv && .peer-venv/bin/pip install torch==2.13.0 \\
        && .peer-venv/bin/pip install nvidia-pytriton transformers

Both servers serve the same local ``save_pretrained`` folders (the ``transformers`` config
defaults, random weights, seed 0, a 2-label head): ``bert-base`` and ``hubert-base``. PyTriton
(``peer_pytriton.py``) runs the ``transformers`` forward eagerly behind Triton's dynamic
batcher (8 requests, 1 ms delay); ``gated serve`` runs the folders retrofitted by ``gated
retrofit`` (random predictors: each request keeps its own channels) with a ``serving.yaml`` of
8 rows per forward and 1 per request, in dense mode and dynamic keep 0.5 / 0.25 (the request's
``gate_mode`` and ``keep_ratio`` parameters), the server's settings otherwise at their defaults.

Loads, each a closed loop of C keep-alive connections driven by ``wrk`` (one C thread, so the
load generator costs little of the 2 cores it shares with the server):
- ``bert128``: V2 JSON, ``input_ids`` + ``attention_mask`` INT64 ``[1, 128]``;
- ``bertmix``: the same with 16 requests of lengths drawn from 32–128, sent in turn, unpadded;
- ``hubert``: V2 binary tensors, ``input`` FP32 ``[1, 32000]`` (2 s of 16 kHz audio).

Per load and concurrency, every server mode runs one window per round, in turn (interleaved,
so a slow spell of the machine falls on all of them); after each window one more request is
answered before the next window starts, so no server still computes a previous window's queue
while another is measured. Throughput is all requests over all windows; p50/p99 are the median
over rounds of each window's. Writes ``results/peer_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT
from native_load import Window, missing_tools, wrk_many

from models.bench import cpu_name
from service.local import HOST, free_port, start_server, stop_process

logger = logging.getLogger("peer_bench")
PYTHON = sys.executable
MODES = ("triton", "dense", "0.5", "0.25")
LOADS = ("bert128", "bertmix", "hubert")
MODEL = {"bert128": "bert-base", "bertmix": "bert-base", "hubert": "hubert-base"}
MAX_BATCH = 8


@dataclass
class Cell:
    load: str
    concurrency: int
    mode: str
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    mean_batch_size: float | None  # gated serve's own histogram; None for the peer


# ---------------------------------------------------------------------- models and servers


def build_folders(work: Path) -> dict[str, Path]:
    """The two ``save_pretrained`` folders (written once per work folder)."""
    import torch
    import transformers as tf

    folders = {"bert-base": work / "src" / "bert-base", "hubert-base": work / "src" / "hubert-base"}
    for name, folder in folders.items():
        if (folder / "config.json").is_file():
            continue
        torch.manual_seed(0)
        model = (tf.BertForSequenceClassification(tf.BertConfig(num_labels=2))
                 if name == "bert-base"
                 else tf.HubertForSequenceClassification(tf.HubertConfig(num_labels=2)))
        model.eval().save_pretrained(folder)
        logger.info("wrote %s", folder)
    return folders


def build_repository(work: Path, folders: dict[str, Path]) -> Path:
    """The folders retrofitted (once per work folder), 8 rows per forward, and a repository
    that serves just these."""
    repo = work / ("serve-" + "-".join(sorted(folders)))
    lengths = {"bert-base": 128, "hubert-base": 32000}
    for name, folder in folders.items():
        out = work / "repo" / name
        if not (repo / name).exists():
            repo.mkdir(parents=True, exist_ok=True)
            (repo / name).symlink_to(out, target_is_directory=True)
        if not (out / "model.safetensors").is_file():
            subprocess.run([PYTHON, "-m", "service.cli", "retrofit", str(folder), "--max-length",
                            str(lengths[name]), "--out", str(out)], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
            logger.info("retrofitted %s", out)
        (out / "serving.yaml").write_text(
            f"max_batch_rows: {MAX_BATCH}\nmax_batch_size: {MAX_BATCH}\nmax_request_rows: 1\n")
    return repo


def _ready(url: str, timeout_s: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"peer not ready after {timeout_s:g} s:\n{log.read_text()}")


def start_peer(peer_python: str, folders: dict[str, Path], log: Path
               ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [peer_python, str(ROOT / "benchmarks" / "peer_pytriton.py"), "--http-port",
               str(port), "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
               "--max-batch", str(MAX_BATCH), "--delay-us", "1000"]
    for name, folder in folders.items():
        command += ["--model", f"{name}={folder}"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        for name in folders:
            _ready(f"http://{HOST}:{port}/v2/models/{name}/ready", 600, process, log)
    except BaseException:
        stop_process(process)
        raise
    return process, port


# ---------------------------------------------------------------------- requests


def _json_body(ids: np.ndarray, parameters: dict[str, object] | None) -> bytes:
    body: dict[str, object] = {"inputs": [
        {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64",
         "data": ids.ravel().tolist()},
        {"name": "attention_mask", "shape": list(ids.shape), "datatype": "INT64",
         "data": [1] * ids.size},
    ]}
    if parameters:
        body["parameters"] = parameters
    return json.dumps(body).encode()


def _binary_body(x: np.ndarray, parameters: dict[str, object] | None
                 ) -> tuple[bytes, dict[str, str]]:
    header: dict[str, object] = {"inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}
    if parameters:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    return head + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def _parameters(mode: str) -> dict[str, object] | None:
    if mode == "triton":
        return None
    if mode == "dense":
        return {"gate_mode": "dense"}
    return {"gate_mode": "dynamic", "keep_ratio": float(mode)}


def requests_of(load: str, mode: str) -> list[tuple[bytes, dict[str, str]]]:
    """The bodies (and extra headers) one load sends, in turn."""
    rng = np.random.default_rng(0)
    params = _parameters(mode)
    json_headers = {"Content-Type": "application/json"}
    if load == "bert128":
        return [(_json_body(rng.integers(1000, 30000, (1, 128)), params), json_headers)]
    if load == "bertmix":
        lengths = rng.integers(32, 129, 16)
        return [(_json_body(rng.integers(1000, 30000, (1, int(n))), params), json_headers)
                for n in lengths]
    x = rng.standard_normal((1, 32000)).astype(np.float32)
    return [_binary_body(x, params)]


# ---------------------------------------------------------------------- load


def wrk(url: str, bodies: list[tuple[bytes, dict[str, str]]], concurrency: int,
        seconds: float) -> Window:
    """A closed-loop window; a long timeout: base-size batches take a second here."""
    return wrk_many(url, bodies, concurrency, seconds, timeout_s=120)


def settle(url: str, body: bytes, headers: dict[str, str]) -> None:
    """One more request, answered after whatever the last window left queued."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=600) as reply:
        reply.read()


def batch_counts(base: str, model: str) -> tuple[float, float]:
    """(requests, batches) gated serve has run for ``model`` so far."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    def value(name: str) -> float:
        found = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0
    return value("gated_batch_size_sum"), value("gated_batch_size_count")


def measure(args: argparse.Namespace, bases: dict[str, str], log: list[str]) -> list[Cell]:
    cells: list[Cell] = []
    for load in args.loads:
        model = MODEL[load]
        bodies = {mode: requests_of(load, mode) for mode in args.modes}
        urls = {mode: f"{bases[mode]}/v2/models/{model}/infer" for mode in args.modes}
        for mode in args.modes:  # unmeasured: first forwards, connections, allocator
            wrk(urls[mode], bodies[mode], 8, 3)
            settle(urls[mode], *bodies[mode][0])
        for concurrency in args.concurrency:
            windows: dict[str, list[Window]] = {mode: [] for mode in args.modes}
            batches: dict[str, list[float]] = {mode: [0.0, 0.0] for mode in args.modes}
            for rnd in range(args.rounds):
                order = args.modes if rnd % 2 == 0 else list(reversed(args.modes))
                for mode in order:
                    before = batch_counts(bases[mode], model) if mode != "triton" else (0, 0)
                    window = wrk(urls[mode], bodies[mode], concurrency, args.seconds)
                    settle(urls[mode], *bodies[mode][0])
                    if mode != "triton":
                        after = batch_counts(bases[mode], model)
                        batches[mode][0] += after[0] - before[0] - 1  # less the settle request
                        batches[mode][1] += after[1] - before[1] - 1
                    windows[mode].append(window)
                    rate = window.requests / window.seconds
                    line = (f"{load} c{concurrency} {mode:>6}: {rate:7.2f} req/s p99 "
                            f"{window.p99_ms:8.1f} ms errors {window.errors}")
                    logger.info(line)
                    log.append(line)
            for mode in args.modes:
                ws = windows[mode]
                requests = sum(w.requests for w in ws)
                seconds = sum(w.seconds for w in ws)
                req, count = batches[mode]
                cells.append(Cell(
                    load=load, concurrency=concurrency, mode=mode, requests=requests,
                    errors=sum(w.errors for w in ws), seconds=round(seconds, 2),
                    throughput_rps=round(requests / seconds, 3),
                    p50_ms=round(statistics.median(w.p50_ms for w in ws), 1),
                    p99_ms=round(statistics.median(w.p99_ms for w in ws), 1),
                    mean_batch_size=round(req / count, 2) if count > 0 else None,
                ))
    return cells


# ---------------------------------------------------------------------- report


LABEL = {"triton": "PyTriton (transformers eager)", "dense": "gated-serve dense",
         "0.5": "gated-serve dynamic 0.5", "0.25": "gated-serve dynamic 0.25"}
LOAD_TEXT = {"bert128": "bert-base, T = 128, JSON", "bertmix": "bert-base, T 32–128, JSON",
             "hubert": "hubert-base, 2 s audio, binary"}


def report(cells: list[Cell], meta: dict[str, object]) -> str:
    lines = [
        f"# Base-size encoders: gated-serve beside PyTriton ({meta['device_name']}, "
        f"{meta['cpus']} CPUs)",
        "",
        f"{meta['note']}",
        "",
        "| load | C | server | req/s | × PyTriton | p50 ms | p99 ms | p99 / PyTriton's |"
        " mean batch | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peer = {(c.load, c.concurrency): c for c in cells if c.mode == "triton"}
    for c in cells:
        ref = peer.get((c.load, c.concurrency))
        ratio = f"{c.throughput_rps / ref.throughput_rps:.3f}" if ref and ref.requests else "—"
        p99 = f"{c.p99_ms / ref.p99_ms:.3f}" if ref and ref.p99_ms else "—"
        batch = "—" if c.mean_batch_size is None else f"{c.mean_batch_size:g}"
        lines.append(f"| {LOAD_TEXT[c.load]} | {c.concurrency} | {LABEL[c.mode]} | "
                     f"{c.throughput_rps:.2f} | {ratio} | {c.p50_ms:g} | {c.p99_ms:g} | {p99} | "
                     f"{batch} | {c.errors} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON",
                                                           str(ROOT / ".peer-venv/bin/python")))
    p.add_argument("--loads", nargs="+", default=list(LOADS), choices=LOADS)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", type=Path, help="keep the folders and repository here (reused)")
    p.add_argument("--name", default="peer_cpu", help="results file stem")
    p.add_argument("--gated-env", nargs="*", default=[],
                   help="extra gated serve settings, KEY=VALUE (GATED_ prefix implied)")
    args = p.parse_args()
    if missing_tools():
        logger.error("needs %s (apt-get install wrk nghttp2-client)", ", ".join(missing_tools()))
        return 2
    if "triton" in args.modes and not Path(args.peer_python).is_file():
        logger.error("no peer interpreter at %s: see the docstring for its venv", args.peer_python)
        return 2
    import torch
    import transformers as tf

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models_needed = {MODEL[load] for load in args.loads}
        folders = {k: v for k, v in build_folders(work).items() if k in models_needed}
        repo = build_repository(work, folders)
        settings: dict[str, object] = {"grpc_port": 0}
        settings.update(kv.split("=", 1) for kv in args.gated_env)
        start = time.monotonic()
        server = start_server(repo, work / "gated.log", settings, cwd=ROOT, ready_timeout_s=900)
        logger.info("gated serve ready in %.1f s", time.monotonic() - start)
        peer = None
        try:
            bases = {mode: server.url for mode in args.modes if mode != "triton"}
            if "triton" in args.modes:
                peer, port = start_peer(args.peer_python, folders, work / "peer.log")
                bases["triton"] = f"http://{HOST}:{port}"
                logger.info("PyTriton ready")
            log: list[str] = []
            cells = measure(args, bases, log)
        finally:
            server.stop()
            if peer is not None:
                stop_process(peer)
    meta: dict[str, object] = {
        "device": "cpu", "device_name": cpu_name(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": tf.__version__, "seconds": args.seconds, "rounds": args.rounds,
        "gated_settings": settings,
        "command": "python benchmarks/peer_bench.py " + " ".join(sys.argv[1:]),
        "note": (
            f"torch {torch.__version__}, transformers {tf.__version__}; {args.rounds} rounds of "
            f"{args.seconds:g} s windows per cell, interleaved; wrk closed loop; both servers "
            f"batch at most {MAX_BATCH} requests. Command: `python benchmarks/peer_bench.py "
            + " ".join(sys.argv[1:]) + "`."),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {**meta, "cells": [asdict(c) for c in cells], "windows": log}, indent=1) + "\n")
    text = report(cells, meta)
    (RESULTS / f"{args.name}.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
