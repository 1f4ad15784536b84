"""gRPC against REST binary tensors through the same server, at one concurrency, and where the
gap lies: what grpcio itself costs per call.

    python benchmarks/grpc_bench.py [--concurrency 32] [--seconds 12] [--rounds 3]
        [--bert-repository DIR] [--threads-tree DIR]

Rows, each a closed loop (``wrk`` for REST, ``h2load`` for gRPC: both one C thread, see
``native_load.py``), interleaved round by round, with the server process's CPU time per request:

- the shipped checkpoint, ``[1, 40]`` FP32: REST binary; gRPC as C connections with one call
  each and as one connection multiplexing C calls (what one tritonclient channel does);
- ``grpc.aio floor``: a process holding only a ``grpc.aio`` server in its event loop that
  parses the request and answers a fixed reply, the least any gRPC front end built on grpcio
  costs per call here (a front end in its own process would pay it on top of the data plane);
- with ``--threads-tree``: the same gRPC rows against the server of another checkout started
  with ``GATED_GRPC_ENGINE=threads`` (grpcio's sync server on a thread pool, each handler
  hopping onto the event loop: commit 8e3231e holds that variant);
- with ``--bert-repository`` (a repository holding a retrofitted ``bert-base``, e.g. the one
  ``peer_bench.py --work DIR`` builds: ``DIR/serve-bert-base``): REST and gRPC with
  ``input_ids`` + ``attention_mask`` INT64 ``[1, 128]``, dense.

Writes ``results/grpc_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import native_load
import numpy as np
import orjson
from common import MODEL, RESULTS, shipped_repository

from models.bench import cpu_name
from service.local import LocalServer, free_port, start_server, stop_process

logger = logging.getLogger("grpc_bench")
Run = Callable[[float], native_load.Window]


def rest_body(tensors: dict[str, np.ndarray], parameters: dict[str, object] | None = None
              ) -> tuple[bytes, dict[str, str]]:
    """A V2 REST request with binary tensors (and binary outputs)."""
    header: dict[str, object] = {
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": _DTYPES[x.dtype.str],
                    "parameters": {"binary_data_size": x.nbytes}} for name, x in tensors.items()],
        "parameters": {"binary_data_output": True, **(parameters or {})},
    }
    head = orjson.dumps(header)
    body = head + b"".join(x.tobytes() for x in tensors.values())
    return body, {"Inference-Header-Content-Length": str(len(head)),
                  "Content-Type": "application/octet-stream"}


def grpc_frame(model: str, tensors: dict[str, np.ndarray],
               parameters: dict[str, str] | None = None) -> bytes:
    """One gRPC message frame of a ModelInferRequest with raw contents."""
    from service.grpc import messages

    request = messages.ModelInferRequest(model_name=model)
    for name, x in tensors.items():
        tensor = request.inputs.add(name=name, datatype=_DTYPES[x.dtype.str])
        tensor.shape.extend(x.shape)
        request.raw_input_contents.append(x.tobytes())
    for key, value in (parameters or {}).items():
        request.parameters[key].string_param = value
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


_DTYPES = {"<f4": "FP32", "<i8": "INT64"}


# ---------------------------------------------------------------------- the floor


def _floor_server(port: int) -> None:
    """The ``grpc.aio floor`` process: parse ModelInfer, answer a fixed reply."""
    import grpc

    from service.grpc import messages

    reply = messages.ModelInferResponse(model_name=MODEL)
    out = reply.outputs.add(name="logits", datatype="FP32")
    out.shape.extend([1, 10])
    reply.raw_output_contents.append(np.zeros(10, "<f4").tobytes())
    data = reply.SerializeToString()

    async def infer(raw: bytes, context: object) -> bytes:
        messages.ModelInferRequest.FromString(raw)
        return data

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(infer)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(messages.SERVICE, {"ModelInfer": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def _start_floor() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port)])
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            import socket

            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, address
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the grpc.aio floor server did not start")


# ---------------------------------------------------------------------- measuring


def _grpc_url(address: str) -> str:
    return f"http://{address}/inference.GRPCInferenceService/ModelInfer"


def _rows(name: str, server: LocalServer, model: str, tensors: dict[str, np.ndarray], c: int,
          parameters: dict[str, object] | None = None, rest: bool = True, timeout_s: float = 10
          ) -> dict[str, tuple[int, Run]]:
    body, headers = rest_body(tensors, parameters)
    frame = grpc_frame(model, tensors, {k: str(v) for k, v in (parameters or {}).items()})
    pid = server.process.pid
    rows: dict[str, tuple[int, Run]] = {}
    if rest:
        url = f"{server.url}/v2/models/{model}/infer"
        rows[f"{name} | rest | wrk, {c} connections"] = (
            pid, lambda s: native_load.wrk_many(url, [(body, headers)], c, s, timeout_s=timeout_s))
    grpc_url = _grpc_url(server.grpc_address)
    rows[f"{name} | grpc | h2load, {c} connections"] = (
        pid, lambda s: native_load.h2load(grpc_url, frame, c, 1, s))
    rows[f"{name} | grpc | h2load, 1 connection x {c} streams"] = (
        pid, lambda s: native_load.h2load(grpc_url, frame, 1, c, s))
    return rows


def measure(rows: dict[str, tuple[int, Run]], seconds: float, rounds: int, warmup: float,
            settle: Callable[[], None] | None = None) -> list[dict[str, object]]:
    """Every row's windows in turn; ``settle`` (after each) waits out what a window left
    queued, so that the next row is not charged for it."""
    for _, run in rows.values():
        run(warmup)
    got: dict[str, list[tuple[native_load.Window, float]]] = {key: [] for key in rows}
    for round_ in range(rounds):
        for key, (pid, run) in rows.items():
            cpu = native_load.cpu_seconds(pid)
            window = run(seconds)
            got[key].append((window, native_load.cpu_seconds(pid) - cpu))
            if settle is not None:
                settle()
            logger.info("round %d %s: %.1f req/s", round_ + 1, key,
                        window.requests / window.seconds)
    points = []
    for key, windows in got.items():
        target, protocol, client = key.split(" | ")
        requests = sum(w.requests for w, _ in windows)
        points.append({
            "target": target, "protocol": protocol, "client": client,
            "requests": requests, "errors": sum(w.errors for w, _ in windows),
            "throughput_rps": round(requests / sum(w.seconds for w, _ in windows), 1),
            "p50_ms": round(float(np.median([w.p50_ms for w, _ in windows])), 2),
            "p99_ms": round(float(np.median([w.p99_ms for w, _ in windows])), 2),
            "server_cpu_us_per_request": round(1e6 * sum(c for _, c in windows)
                                               / max(1, requests)),
        })
    return points


def report(result: dict[str, object]) -> str:
    lines = [f"gRPC and REST binary at concurrency {result['concurrency']} on "
             f"{result['cpu']} ({result['cpus']} CPUs), {result['seconds']} s x "
             f"{result['rounds']} rounds per row, interleaved. Command: `{result['command']}`",
             "", "| target | protocol | load generator | req/s | vs REST | p50 ms | p99 ms | "
             "server CPU µs/req | errors |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    points: list[dict[str, object]] = result["points"]  # type: ignore[assignment]
    rest = {p["target"]: p["throughput_rps"] for p in points if p["protocol"] == "rest"}
    for p in points:
        base = rest.get(str(p["target"]).split(" (")[0])
        ratio = f"{float(p['throughput_rps']) / float(base):.2f}x" if base else ""
        lines.append(f"| {p['target']} | {p['protocol']} | {p['client']} | "
                     f"{p['throughput_rps']} | {ratio} | {p['p50_ms']} | {p['p99_ms']} | "
                     f"{p['server_cpu_us_per_request']} | {p['errors']} |")
    return "\n".join(lines) + "\n"


def shipped_rows(args: argparse.Namespace, tmp: Path) -> list[dict[str, object]]:
    """The shipped checkpoint's rows, the grpc.aio floor's and (``--threads-tree``) the
    thread-pool variant's, interleaved."""
    c = args.concurrency
    x = {"input": np.random.default_rng(0).standard_normal((1, 40)).astype("<f4")}
    settings = {"max_batch_size": 32, "log_level": "warning"}
    repository, _ = shipped_repository(tmp)
    servers = [start_server(repository, tmp / "current.log", settings,
                            ready_timeout_s=120)]
    floor, floor_address = _start_floor()
    try:
        rows = _rows("shipped", servers[0], MODEL, x, c)
        frame = grpc_frame(MODEL, x)
        rows[f"grpc.aio floor (fixed reply) | grpc | h2load, {c} connections"] = (
            floor.pid, lambda s: native_load.h2load(_grpc_url(floor_address), frame, c, 1, s))
        rows[f"grpc.aio floor (fixed reply) | grpc | h2load, 1 connection x {c} streams"] = (
            floor.pid, lambda s: native_load.h2load(_grpc_url(floor_address), frame, 1, c, s))
        if args.threads_tree is not None:
            os.environ["GATED_GRPC_ENGINE"] = "threads"
            try:
                servers.append(start_server(repository, tmp / "threads.log", settings,
                                            cwd=args.threads_tree.resolve(),
                                            ready_timeout_s=120))
            finally:
                del os.environ["GATED_GRPC_ENGINE"]
            rows.update(_rows("shipped (sync server, thread pool)", servers[1], MODEL, x, c,
                              rest=False))
        return measure(rows, args.seconds, args.rounds, warmup=1.0)
    finally:
        stop_process(floor)
        for server in servers:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="per window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bert-repository", type=Path)
    parser.add_argument("--bert-seconds", type=float, default=15.0, help="per bert-base window")
    parser.add_argument("--threads-tree", type=Path)
    parser.add_argument("--no-shipped", action="store_true", help="only the bert-base rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="grpc_cpu")
    parser.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        _floor_server(args.floor_server)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    missing = native_load.missing_tools()
    if missing:
        raise SystemExit(f"needs {' and '.join(missing)}: apt-get install wrk nghttp2-client")
    c = args.concurrency
    points: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_shipped:
            points += shipped_rows(args, Path(tmp))
        if args.bert_repository is not None:
            bert = start_server(args.bert_repository, Path(tmp) / "bert.log",
                                {"log_level": "warning"}, ready_timeout_s=900)
            try:
                ids = np.random.default_rng(0).integers(1000, 30000, (1, 128)).astype("<i8")
                tensors = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                rows = _rows("bert-base", bert, "bert-base", tensors, c,
                             parameters={"gate_mode": "dense"}, timeout_s=120)
                body, headers = rest_body(tensors, {"gate_mode": "dense"})

                def settle() -> None:
                    request = urllib.request.Request(
                        f"{bert.url}/v2/models/bert-base/infer", data=body, headers=headers)
                    with urllib.request.urlopen(request, timeout=600) as reply:
                        reply.read()

                points += measure(rows, args.bert_seconds, 2, warmup=5.0, settle=settle)
            finally:
                bert.stop()
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu_name(), "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "concurrency": c, "points": points,
        "seconds": args.bert_seconds if args.no_shipped else args.seconds,
        "rounds": 2 if args.no_shipped else args.rounds,
        "bert_base": f"{args.bert_seconds:g} s x 2 rounds, each window settled"
        if args.bert_repository is not None else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(report(result))
    sys.stdout.write(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
