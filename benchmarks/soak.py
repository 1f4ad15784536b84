"""Soak test of ``gated serve``: minutes of mixed load with runtime gate switches.

Usage::

    .venv/bin/python benchmarks/soak.py                  # 5 minutes
    .venv/bin/python benchmarks/soak.py --minutes 1      # short run

One real server runs as a subprocess on 127.0.0.1 with an admin token. ``--concurrency``
connections send requests back to back (closed loop), each request drawn at random from a mix:
V2 JSON or binary tensors, 1 to 4 rows, sequence lengths up to the model's limit, and a quarter
of them with a per-request gate mode. Meanwhile the admin API switches the model's runtime gate
every ``--switch-every`` seconds, cycling dense, static and dynamic at a few keep ratios.

Reported: throughput, p50/p99 latency, error count (anything but 200, must be 0), gate switches,
and the server's RSS (VmRSS from /proc) after warm-up and at the end; its growth must stay under
10%. Results go to ``benchmarks/results/soak_<device>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
from common import MODEL, RESULTS, ROOT, shipped_repository

from service.local import start_server

GATES: tuple[dict[str, object], ...] = (
    {"mode": "dense"}, {"mode": "static"}, {"mode": "dynamic"},
    {"mode": "dynamic", "keep_ratio": 0.25}, {"mode": "static", "keep_ratio": 0.5},
)

logger = logging.getLogger("soak")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _request(rng: random.Random, max_length: int) -> tuple[bytes, dict[str, str]]:
    rows, length = rng.randint(1, 4), rng.randint(8, max_length)
    x = np.random.default_rng(rng.getrandbits(32)).standard_normal((rows, length))
    x = x.astype(np.float32)
    params: dict[str, object] = {}
    if rng.random() < 0.25:
        params["gate_mode"] = rng.choice(["dense", "static", "dynamic"])
    tensor: dict[str, object] = {"name": "input", "shape": [rows, length], "datatype": "FP32"}
    if rng.random() < 0.5:
        tensor["data"] = x.ravel().tolist()
        return orjson.dumps({"inputs": [tensor], "parameters": params}), {}
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    header = orjson.dumps({"inputs": [tensor], "parameters": params})
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


async def _client(
    url: str, seed: int, max_length: int, until: float, latencies: list[float], errors: list[str]
) -> None:
    rng = random.Random(seed)
    bodies = [_request(rng, max_length) for _ in range(64)]
    async with httpx.AsyncClient(timeout=30.0) as client:
        while time.monotonic() < until:
            body, headers = rng.choice(bodies)
            start = time.monotonic()
            try:
                response = await client.post(url, content=body, headers=headers)
                status = str(response.status_code)
            except httpx.HTTPError as err:
                status = type(err).__name__
            latencies.append(time.monotonic() - start)
            if status != "200":
                errors.append(status)


async def _switcher(base: str, token: str, every_s: float, until: float) -> int:
    switches = 0
    async with httpx.AsyncClient(
        timeout=30.0, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        while time.monotonic() + every_s < until:
            await asyncio.sleep(every_s)
            gate = GATES[switches % len(GATES)]
            response = await client.put(f"{base}/admin/models/{MODEL}/gate", json=gate)
            response.raise_for_status()
            switches += 1
    return switches


async def _sample_rss(pid: int, every_s: float, until: float, samples: list[int]) -> None:
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        samples.append(_rss_kib(pid))


async def _soak(
    base: str, pid: int, args: argparse.Namespace, token: str, max_length: int
) -> dict[str, object]:
    url = f"{base}/v2/models/{MODEL}/infer"
    # Warm-up visits every gate configuration once, so that their compiled plans (kept per
    # configuration, bounded) count in the baseline RSS rather than as growth.
    warm_until = time.monotonic() + args.warmup
    await asyncio.gather(
        *(_client(url, i, max_length, warm_until, [], []) for i in range(args.concurrency)),
        _switcher(base, token, args.warmup / (len(GATES) + 1), warm_until),
    )
    rss_start = _rss_kib(pid)
    latencies: list[float] = []
    errors: list[str] = []
    start = time.monotonic()
    until = start + args.minutes * 60.0
    timeline: list[int] = [rss_start]
    *_, switches, _ = await asyncio.gather(
        *(_client(url, 1000 + i, max_length, until, latencies, errors)
          for i in range(args.concurrency)),
        _switcher(base, token, args.switch_every, until),
        _sample_rss(pid, 15.0, until, timeline),
    )
    elapsed = time.monotonic() - start
    rss_end = _rss_kib(pid)
    lat_ms = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "errors": len(errors),
        "error_statuses": sorted(set(errors)),
        "gate_switches": switches,
        "rss_kib_after_warmup": rss_start,
        "rss_kib_end": rss_end,
        "rss_growth": round(rss_end / rss_start - 1.0, 4),
        "rss_kib_every_15s": [*timeline, rss_end],
    }


def _run(args: argparse.Namespace) -> dict[str, object]:
    from models import load_checkpoint

    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp:
        repository, source = shipped_repository(Path(tmp))
        max_length = load_checkpoint(repository / MODEL).config.model.max_length
        server = start_server(
            repository,
            Path(tmp) / "server.log",
            {"admin_token": token, "log_level": "warning", "device": args.device},
            cwd=ROOT,
            ready_timeout_s=120,
        )
        try:
            figures = asyncio.run(_soak(server.url, server.process.pid, args, token, max_length))
        finally:
            exit_code = server.stop(60)
    return {
        "device": "cuda" if args.device == "cuda" else "cpu",
        "minutes": args.minutes,
        "note": f"a {args.minutes:g}-minute run" + (
            " (shorter than the 5-minute default)" if args.minutes < 5 else ""
        ),
        "concurrency": args.concurrency,
        "switch_every_s": args.switch_every,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "model_source": source,
        **figures,
        "server_exit_code": exit_code,
        "pass": figures["errors"] == 0 and float(figures["rss_growth"]) < 0.10  # type: ignore[arg-type]
        and exit_code == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="measured minutes")
    parser.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--switch-every", type=float, default=2.0, help="seconds between switches")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    result = _run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak_{result['device']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", path)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
