"""The longest the event loop can be held by one request's body: ``decode_request`` (the byte
and value bounds, orjson, the codec's checks) timed on the worst inputs the shipped model's
limits still let through, and on what they refuse.

Usage::

    .venv/bin/python benchmarks/parse_stall.py

Decoding runs on the event loop (orjson holds the GIL, so a thread would not free it), so its
time is the stall every other connection sees. The limits are the data plane's own
(``DataPlane.limits`` for the shipped model under default settings). Each case is timed 20
times; the table has the median and the worst, and the peak memory the decoding allocates
(tracemalloc, one more run) over the body's size. As in the server, long-lived objects are frozen
out of the garbage collector first (``gc.freeze``). Written to
``benchmarks/results/parse_stall_<device>.{json,md}``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import orjson
from common import RESULTS, SHIPPED

from models import load_config
from service.dataplane import BYTES_PER_ELEMENT, OVERHEAD_BYTES, OVERHEAD_VALUES
from service.errors import InvalidInput
from service.protocol.codec import decode_request, json_values_bound
from service.settings import Settings

HEAD = b'{"inputs":[{"name":"input","shape":[%d,%d],"datatype":"FP32","data":['


def _limits() -> tuple[int, int, int]:
    cfg = load_config(SHIPPED / "mnist1d-conv" / "config.yaml")
    rows = Settings.model_fields["max_request_rows"].default
    elements = rows * cfg.model.max_length * cfg.model.in_channels
    max_bytes = min(Settings.model_fields["max_request_bytes"].default,
                    elements * BYTES_PER_ELEMENT + OVERHEAD_BYTES)
    return elements, max_bytes, elements + OVERHEAD_VALUES


def _cases(elements: int, max_bytes: int, max_values: int) -> dict[str, bytes]:
    rows, length = 64, elements // 64
    floats = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
    # The largest valid request, written as tritonclient writes JSON (17-digit floats).
    largest = orjson.dumps({"inputs": [{"name": "input", "shape": [rows, length],
                                        "datatype": "FP32",
                                        "data": [float(v) for v in floats.astype(np.float64)]}]})
    # As many tiny nested values as the value bound allows, then padded with spaces to the
    # byte limit: the most objects per byte that passes the scan.
    units = max_values // 2
    nested = b""
    while not nested or json_values_bound(nested) > max_values:
        units -= 1
        nested = HEAD % (1, 40) + b"[0]," * (units - 1) + b"[0]]}]}"
    nested += b" " * (max_bytes - len(nested))
    # One long string (an id) filling the byte limit (decoded; the data plane then refuses the
    # request for its missing input).
    long_id = orjson.dumps({"id": "x" * (max_bytes - 200), "inputs": []})
    # Deep nesting at orjson's limit.
    deep = HEAD % (1, 40) + b"[" * 1000 + b"0" + b"]" * 1000 + b"]}]}"
    # Refused by the scan: values over the bound, under the byte limit.
    over = HEAD % (1, 40) + b"0," * (max_bytes // 2 - 100) + b"0]}]}"
    return {
        "largest valid request (64 x 512 floats)": largest,
        "tiny nested values at the value bound": nested,
        "one long string": long_id,
        "nesting 1000 deep": deep,
        "values over the bound (refused by the scan)": over,
    }


def _time(run: Callable[[], object], reps: int = 20) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> int:
    elements, max_bytes, max_values = _limits()
    # As the server does once it is ready: long-lived objects leave the collector's scans, so
    # a collection triggered by a request's allocations walks only what is new.
    gc.collect()
    gc.freeze()
    rows = []
    for name, body in _cases(elements, max_bytes, max_values).items():
        assert len(body) <= max_bytes, (name, len(body), max_bytes)

        def decode(body: bytes = body) -> str:
            try:
                decode_request(body, max_inputs=16, max_outputs=16,
                               max_tensor_elements=elements, max_json_values=max_values)
                return "decoded"
            except InvalidInput as err:
                return f"{type(err).__name__}: {err.message[:60]}"

        outcome = decode()
        times = _time(decode)
        tracemalloc.start()
        decode()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({"case": name, "bytes": len(body), "outcome": outcome,
                     "median_ms": round(statistics.median(times), 3),
                     "worst_ms": round(max(times), 3),
                     "peak_memory_over_body": round(peak / len(body), 2)})
        sys.stderr.write(f"{rows[-1]}\n")
    result = {
        "device": "cpu", "cpus": os.cpu_count(), "python": platform.python_version(),
        "model": "mnist1d-conv (shipped), default settings",
        "limits": {"max_tensor_elements": elements, "max_request_bytes": max_bytes,
                   "max_json_values": max_values},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "parse_stall_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Event-loop time of one body's decoding, shipped model under default limits "
        f"({elements} elements, {max_bytes} bytes, {max_values} JSON values); cpu "
        f"({os.cpu_count()} CPUs), 20 runs each.",
        "",
        "| body | bytes | outcome | median (ms) | worst (ms) | peak memory / body size |",
        "|---|---:|---|---:|---:|---:|",
        *(f"| {r['case']} | {r['bytes']} | {r['outcome']} | {r['median_ms']} | "
          f"{r['worst_ms']} | {r['peak_memory_over_body']} |" for r in rows),
    ]
    (RESULTS / "parse_stall_cpu.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
