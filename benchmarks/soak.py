"""Soak test of ``gated serve``: minutes of mixed load with runtime gate switches.

Usage::

    .venv/bin/python benchmarks/soak.py                  # 5 minutes
    .venv/bin/python benchmarks/soak.py --minutes 1      # short run

One real server runs as a subprocess on 127.0.0.1 with an admin token. ``--concurrency``
connections send requests back to back (closed loop), each request drawn at random from a mix:
V2 JSON or binary tensors, 1 to 4 rows, sequence lengths up to the model's limit, and a quarter
of them with a per-request gate mode. Meanwhile the admin API switches the model's runtime gate
every ``--switch-every`` seconds, cycling dense, static and dynamic at a few keep ratios.

With ``--hostile-rate R`` (hostile requests per second) the measured time is two phases of
``--minutes`` each, on one server: the normal load alone, then the same load with hostile
traffic mixed in, one kind after another: gate parameters cycled (keep ratios outside the served
set, a new blend weight or threshold every request), slow bodies (half a body, then silence until
the server's body timeout closes the connection), oversized bodies (a 16 MiB Content-Length, and
a chunked body that never ends) and malformed binary requests. The normal requests' p99 under
hostile traffic is compared with the phase without (it must stay within 1.5x), and every
hostile request must get the 4xx it deserves (or 200 for valid cycled parameters).

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
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------- hostile traffic

HOSTILE_KINDS = ("gate_cycling", "slow_body", "oversized_body", "malformed_binary")
# Read timeout of the soak's server: a slow body is held this long, then closed with 408.
SOAK_BODY_TIMEOUT_S = 5.0


async def _raw(port: int, data: bytes, then: bytes | None = None) -> bytes:
    """Send ``data`` on a new connection (then ``then`` unless the server answered), read the
    answer to its end; the first line of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if then is not None:
            try:
                answer = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                writer.write(then)
                answer = b""
            if answer:
                return answer.split(b"\r\n", 1)[0]
        answer = await asyncio.wait_for(reader.read(65536), SOAK_BODY_TIMEOUT_S + 10)
        return answer.split(b"\r\n", 1)[0]
    except (ConnectionError, TimeoutError) as err:
        return type(err).__name__.encode()
    finally:
        writer.close()


async def _hostile_one(
    kind: str, port: int, client: httpx.AsyncClient, url: str, rng: random.Random
) -> str:
    path = f"/v2/models/{MODEL}/infer"
    x = np.ones((1, 40), dtype=np.float32)
    if kind == "gate_cycling":
        choice = rng.randrange(3)
        params: dict[str, object] = (
            {"keep_ratio": round(rng.uniform(0.01, 0.99), 6)} if choice == 0 else
            {"keep_ratio": 0.5, "dynamic_weight": round(rng.random(), 6)} if choice == 1 else
            {"threshold": round(rng.random(), 6)}
        )
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 40], "datatype": "FP32",
                                         "data": x.ravel().tolist()}], "parameters": params})
        reply = await client.post(url, content=body)
        return str(reply.status_code)
    if kind == "slow_body":
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 40], "datatype": "FP32",
                                         "data": x.ravel().tolist()}]})
        head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Length: {len(body)}\r\n\r\n"
        line = await _raw(port, head.encode() + body[: len(body) // 2])
        return line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.1") else line.decode()
    if kind == "oversized_body":
        if rng.random() < 0.5:  # declared: refused before any of it is read
            head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Length: {16 << 20}\r\n\r\n"
            line = await _raw(port, head.encode() + b"[" * 65536)
        else:  # chunked: refused once the model's limit is passed
            head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\n"
            chunk = b"10000\r\n" + b"[0]," * 16384 + b"\r\n"
            line = await _raw(port, head.encode() + chunk * 8, chunk * 16)
        return line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.1") else line.decode()
    # malformed binary: the header says more bytes than follow, or a shape the bytes don't fill
    header = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 40], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 160}}]})
    raw = x.tobytes()[: rng.choice([0, 80, 159])]
    reply = await client.post(url, content=header + raw,
                              headers={"Inference-Header-Content-Length": str(len(header))})
    return str(reply.status_code)


# What each hostile kind must get: anything else is a failure of the hardening.
HOSTILE_EXPECTED: dict[str, set[str]] = {
    "gate_cycling": {"200", "400"},
    "slow_body": {"408"},
    "oversized_body": {"413"},
    "malformed_binary": {"400"},
}


async def _hostile(
    base: str, port: int, rate: float, until: float, outcomes: dict[str, dict[str, int]]
) -> None:
    """``rate`` hostile requests per second until ``until``, the kinds in turn; each runs as
    its own task (a slow body lasts the server's body timeout)."""
    rng = random.Random(7)
    url = f"{base}/v2/models/{MODEL}/infer"
    tasks: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(timeout=30.0) as client:

        async def one(kind: str) -> None:
            try:
                status = await _hostile_one(kind, port, client, url, rng)
            except httpx.HTTPError as err:
                status = type(err).__name__
            counts = outcomes.setdefault(kind, {})
            counts[status] = counts.get(status, 0) + 1

        n = 0
        while time.monotonic() < until:
            tasks.append(asyncio.create_task(one(HOSTILE_KINDS[n % len(HOSTILE_KINDS)])))
            n += 1
            await asyncio.sleep(1.0 / rate)
        await asyncio.gather(*tasks)


async def _timed(ended: list[float], *clients: Coroutine[Any, Any, None]) -> None:
    """Run the clients; note when the last one ended (hostile slow bodies may linger on)."""
    await asyncio.gather(*clients)
    ended.append(time.monotonic())


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
    base: str, port: int, pid: int, args: argparse.Namespace, token: str, max_length: int
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
    timeline: list[int] = [rss_start]
    phases = [False, True] if args.hostile_rate > 0 else [False]
    figures: dict[str, object] = {}
    for hostile in phases:
        latencies: list[float] = []
        errors: list[str] = []
        outcomes: dict[str, dict[str, int]] = {}
        start = time.monotonic()
        until = start + args.minutes * 60.0
        extra = [_hostile(base, port, args.hostile_rate, until, outcomes)] if hostile else []
        ended: list[float] = []

        _, switches, *_ = await asyncio.gather(
            _timed(ended, *(_client(url, 1000 + i, max_length, until, latencies, errors)
                            for i in range(args.concurrency))),
            _switcher(base, token, args.switch_every, until),
            _sample_rss(pid, 15.0, until, timeline),
            *extra,
        )
        elapsed = ended[0] - start
        lat_ms = np.asarray(latencies) * 1000.0
        phase: dict[str, object] = {
            "requests": len(latencies),
            "throughput_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
            "errors": len(errors),
            "error_statuses": sorted(set(errors)),
            "gate_switches": switches,
        }
        if hostile:
            phase["hostile_rate_per_s"] = args.hostile_rate
            phase["hostile_outcomes"] = outcomes
            phase["hostile_unexpected"] = {
                kind: {s: n for s, n in counts.items() if s not in HOSTILE_EXPECTED[kind]}
                for kind, counts in outcomes.items()
                if set(counts) - HOSTILE_EXPECTED[kind]
            }
            figures["with_hostile"] = phase
        else:
            figures.update(phase)
    rss_end = _rss_kib(pid)
    figures.update({
        "rss_kib_after_warmup": rss_start,
        "rss_kib_end": rss_end,
        "rss_growth": round(rss_end / rss_start - 1.0, 4),
        "rss_kib_every_15s": [*timeline, rss_end],
    })
    if "with_hostile" in figures:
        with_hostile = figures["with_hostile"]
        assert isinstance(with_hostile, dict)
        figures["p99_ratio_hostile_vs_normal"] = round(
            float(with_hostile["p99_ms"]) / float(figures["p99_ms"]), 3  # type: ignore[arg-type]
        )
    return figures


def _run(args: argparse.Namespace) -> dict[str, object]:
    from models import load_checkpoint

    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp:
        repository, source = shipped_repository(Path(tmp))
        max_length = load_checkpoint(repository / MODEL).config.model.max_length
        server = start_server(
            repository,
            Path(tmp) / "server.log",
            {"admin_token": token, "log_level": "warning", "device": args.device,
             "body_timeout_s": SOAK_BODY_TIMEOUT_S},
            cwd=ROOT,
            ready_timeout_s=120,
        )
        try:
            figures = asyncio.run(
                _soak(server.url, server.port, server.process.pid, args, token, max_length)
            )
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
        "server_body_timeout_s": SOAK_BODY_TIMEOUT_S,
        "pass": _passed(figures) and exit_code == 0,
    }


def _passed(figures: dict[str, object]) -> bool:
    ok = figures["errors"] == 0 and float(figures["rss_growth"]) <= 0.10  # type: ignore[arg-type]
    hostile = figures.get("with_hostile")
    if isinstance(hostile, dict):
        ok = ok and hostile["errors"] == 0 and not hostile["hostile_unexpected"]
        ok = ok and float(figures["p99_ratio_hostile_vs_normal"]) <= 1.5  # type: ignore[arg-type]
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="measured minutes")
    parser.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--switch-every", type=float, default=2.0, help="seconds between switches")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--hostile-rate", type=float, default=0.0,
                        help="hostile requests per second in a second phase (0: none)")
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
