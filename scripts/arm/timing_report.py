"""Summarise two ``session_timing.py`` results (native, emulated) in one line.

python scripts/arm/timing_report.py NATIVE.json EMULATED.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    native, emulated = (json.loads(Path(p).read_text()) for p in argv[1:3])
    if native["probs_sha256"] == emulated["probs_sha256"]:
        outputs = "probabilities bit-identical"
    else:
        diff = max(abs(a - b) for a, b in zip(native["probs"], emulated["probs"], strict=True))
        outputs = f"probabilities differ by at most {diff:.2g}"
    ratio = emulated["median_us"] / native["median_us"]
    sys.stdout.write(
        f"session.run {native['pack']} batch 1, 1 thread, {native['windows']} windows:"
        f" native median {native['median_us']:.1f} us (p99 {native['p99_us']:.1f}),"
        f" emulated median {emulated['median_us']:.1f} us (p99 {emulated['p99_us']:.1f}),"
        f" {ratio:.0f}x slower emulated; {outputs}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
