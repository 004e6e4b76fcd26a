"""Compare two ``edge-agent score`` outputs line by line; exit 1 on any difference.

Used by scripts/arm_check.sh to check that the aarch64 run decided what the native run
decided. Per line: ``id``, ``label``, ``route``, ``reason`` and ``model`` must be equal,
``confidence`` within ``--tol``; rejected lines must carry the same error code and message.
``latency_ms`` is not compared (it is a timing); its medians are printed.

``--confident-only`` (the llama.cpp check): ``id``, ``model`` and rejections must be equal,
and so must the label wherever either side acted on it locally (``route`` local). Label
differences on readings both sides escalate (the cloud answers those), and differences in
``route``, ``reason`` and ``confidence``, are counted and printed but do not fail: the LLM
pack's confidences move between CPU builds (docs/arm.md).

Prints a one-line summary, or the differences.

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
CONFIDENT_ONLY = ("id", "model")
SHOWN = 10


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _differences(
    where: str, a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...], tol: float | None
) -> list[str]:
    if ("error" in a) != ("error" in b):
        return [f"{where}: native {a} vs emulated {b}"]
    if "error" in a:
        return [] if a == b else [f"{where}: error {a['error']} vs {b['error']}"]
    out = [f"{where}: {k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    local = "local" in (a.get("route"), b.get("route"))
    if "label" not in keys and local and a.get("label") != b.get("label"):
        out.append(
            f"{where}: label {a.get('label')!r} ({a.get('route')}) vs {b.get('label')!r}"
            f" ({b.get('route')}): a local decision with a different label"
        )
    if tol is not None and abs(float(a["confidence"]) - float(b["confidence"])) > tol:
        out.append(f"{where}: confidence {a['confidence']} vs {b['confidence']} (tol {tol})")
    return out


def _latency(native: list[dict[str, Any]], emulated: list[dict[str, Any]]) -> str:
    medians = [
        statistics.median(float(d["latency_ms"]) for d in side if "latency_ms" in d)
        for side in (native, emulated)
    ]
    return f"; median latency_ms native {medians[0]:.3f}, emulated {medians[1]:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("native", type=Path)
    parser.add_argument("emulated", type=Path)
    parser.add_argument("--tol", type=float, default=1e-5, help="largest confidence difference")
    parser.add_argument(
        "--confident-only",
        action="store_true",
        help="fail only on label differences of decisions either side took locally",
    )
    args = parser.parse_args()
    native, emulated = _lines(args.native), _lines(args.emulated)
    problems: list[str] = []
    if not native:
        problems.append(f"{args.native}: no output lines")
    if len(native) != len(emulated):
        problems.append(f"{len(native)} native lines vs {len(emulated)} emulated lines")
    keys, tol = (CONFIDENT_ONLY, None) if args.confident_only else (EXACT, args.tol)
    routes: Counter[str] = Counter()
    diffs: list[float] = []
    moved: list[str] = []  # --confident-only: route or label changes, reported
    for n, (a, b) in enumerate(zip(native, emulated, strict=False), start=1):
        where = f"line {n} (id {a.get('id', b.get('id'))!r})"
        problems += _differences(where, a, b, keys, tol)
        if "error" in a or "error" in b:
            routes["rejected"] += 1
            continue
        routes[str(a.get("route"))] += 1
        diffs.append(abs(float(a["confidence"]) - float(b["confidence"])))
        if a.get("route") != b.get("route") or a.get("label") != b.get("label"):
            moved.append(
                f"{a.get('id')}: {a['label']} {a['route']} {a['confidence']}"
                f" -> {b['label']} {b['route']} {b['confidence']}"
            )
    if problems:
        sys.stdout.write(f"{len(problems)} difference(s):\n")
        sys.stdout.write("".join(f"  {p}\n" for p in problems[:SHOWN]))
        if len(problems) > SHOWN:
            sys.stdout.write(f"  ... and {len(problems) - SHOWN} more\n")
        return 1
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(routes.items()))
    identical = sum(d == 0.0 for d in diffs)
    conf = (
        f"confidence max |diff| {max(diffs):.2g}, median {statistics.median(diffs):.2g},"
        f" {identical}/{len(diffs)} identical to 6 decimals"
        if diffs
        else "no decisions"
    )
    what = "lines, no confident disagreement" if args.confident_only else "lines equal"
    routed = ""
    if args.confident_only:
        routed = f"; label or route differs on {len(moved)}/{len(diffs)}" + (
            f" ({'; '.join(moved[:SHOWN])}{'; ...' if len(moved) > SHOWN else ''})" if moved else ""
        )
    latency = _latency(native, emulated) if diffs else ""
    sys.stdout.write(f"{len(native)} {what} (native: {kinds}); {conf}{routed}{latency}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
