"""Compare two ``edge-agent score`` outputs line by line; exit 1 on any difference.

Used by scripts/arm_check.sh to check that the aarch64 run decided exactly what the native
run decided. Per line: ``id``, ``label``, ``route``, ``reason`` and ``model`` must be equal,
``confidence`` within ``--tol``; rejected lines must carry the same error code and message.
``latency_ms`` is not compared (it is a timing); its medians are printed. Prints a one-line
summary, or the differences.

    python scripts/arm/compare_decisions.py NATIVE.jsonl EMULATED.jsonl [--tol 1e-5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

EXACT = ("id", "label", "route", "reason", "model")
SHOWN = 10


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _differences(n: int, a: dict[str, Any], b: dict[str, Any], tol: float) -> list[str]:
    where = f"line {n} (id {a.get('id', b.get('id'))!r})"
    if ("error" in a) != ("error" in b):
        return [f"{where}: native {a} vs emulated {b}"]
    if "error" in a:
        return [] if a == b else [f"{where}: error {a['error']} vs {b['error']}"]
    out = [
        f"{where}: {key} {a.get(key)!r} vs {b.get(key)!r}"
        for key in EXACT
        if a.get(key) != b.get(key)
    ]
    if abs(float(a["confidence"]) - float(b["confidence"])) > tol:
        out.append(f"{where}: confidence {a['confidence']} vs {b['confidence']} (tol {tol})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("native", type=Path)
    parser.add_argument("emulated", type=Path)
    parser.add_argument("--tol", type=float, default=1e-5, help="largest confidence difference")
    args = parser.parse_args()
    native, emulated = _lines(args.native), _lines(args.emulated)
    problems: list[str] = []
    if not native:
        problems.append(f"{args.native}: no output lines")
    if len(native) != len(emulated):
        problems.append(f"{len(native)} native lines vs {len(emulated)} emulated lines")
    routes: Counter[str] = Counter()
    max_diff, identical = 0.0, 0
    for n, (a, b) in enumerate(zip(native, emulated, strict=False), start=1):
        problems += _differences(n, a, b, args.tol)
        if "error" in a:
            routes["rejected"] += 1
            continue
        routes[str(a.get("route"))] += 1
        if "confidence" in b:
            diff = abs(float(a["confidence"]) - float(b["confidence"]))
            max_diff = max(max_diff, diff)
            identical += diff == 0.0
    if problems:
        sys.stdout.write(f"{len(problems)} difference(s):\n")
        sys.stdout.write("".join(f"  {p}\n" for p in problems[:SHOWN]))
        if len(problems) > SHOWN:
            sys.stdout.write(f"  ... and {len(problems) - SHOWN} more\n")
        return 1
    decided = sum(v for k, v in routes.items() if k != "rejected")
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(routes.items()))
    latency = ""
    if decided:
        med_a, med_b = (
            statistics.median(float(d["latency_ms"]) for d in side if "latency_ms" in d)
            for side in (native, emulated)
        )
        latency = f"; median latency_ms native {med_a:.3f}, emulated {med_b:.3f}"
    sys.stdout.write(
        f"{len(native)} lines equal ({kinds}); confidence max |diff| {max_diff:.2g},"
        f" {identical}/{decided} identical to 6 decimals{latency}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
