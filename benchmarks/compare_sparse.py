"""Compare ``gated bench --json`` runs cell by cell: speedup relative to dense, old vs new.

    python benchmarks/compare_sparse.py --old a.jsonl b.jsonl --new c.jsonl d.jsonl \\
        [--out benchmarks/results/sparse_regression_cpu.md]

Each cell's noise is the spread between the runs of the same code (runs of one code measured
in one session, interleaved with the other code's runs); a cell regresses when the best new
speedup is below the worst old one by more than that noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(paths: list[Path]) -> list[dict[tuple[str, int, float], dict[str, float]]]:
    runs = []
    for path in paths:
        cells = {}
        for line in path.read_text().splitlines():
            if line.strip():
                c = json.loads(line)
                cells[(c["model"], c["batch"], c["keep_ratio"])] = c
        runs.append(cells)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, nargs="+", required=True)
    parser.add_argument("--new", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    old, new = _load(args.old), _load(args.new)
    keys = [k for k in old[0] if all(k in r for r in old + new)]
    lines = [
        "| model | batch | keep | old speedup (runs) | new speedup (runs) | noise | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    regressions = 0
    for key in keys:
        o = [r[key]["speedup"] for r in old]
        n = [r[key]["speedup"] for r in new]
        noise = max(max(o) - min(o), max(n) - min(n))
        worse = max(n) < min(o) - noise
        regressions += worse
        verdict = "slower" if worse else ("faster" if min(n) > max(o) + noise else "same")
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {' / '.join(f'{v:.2f}' for v in o)} | "
            f"{' / '.join(f'{v:.2f}' for v in n)} | {noise:.2f} | {verdict} |"
        )
    table = "\n".join(lines) + f"\n\ncells slower beyond the noise: {regressions} of {len(keys)}\n"
    sys.stdout.write(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
