"""Write a deterministic, harder variant of a readings file for the aarch64 comparison.

The clean test windows are all confidently classified, so a native/emulated comparison on
them alone never exercises the thresholds. This writes, for every input window, copies
with Gaussian noise at 0.5x, 1x and 2x each channel's standard deviation (seeded), one with a
saturated channel, and a few malformed lines, so both runs also cross the confidence
threshold, trip the out-of-distribution guard and reject bad input. Run natively; the same
file is scored by both architectures.

    python scripts/arm/noisy_readings.py TEST.jsonl OUT.jsonl [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

NOISE_LEVELS = (0.5, 1.0, 2.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = [json.loads(s) for s in args.source.read_text().splitlines() if s.strip()]
    lines: list[str] = []
    for row in rows:
        x = np.asarray(row["values"], dtype=np.float64)
        std = x.std(axis=1, keepdims=True)
        for level in NOISE_LEVELS:
            noisy = x + rng.normal(size=x.shape) * std * level
            values = np.round(noisy, 6).tolist()
            lines.append(json.dumps({"id": f"{row['id']}-n{level:g}", "values": values}))
        saturated = x.copy()
        saturated[0, x.shape[1] // 2 :] = x[0].max()
        values = np.round(saturated, 6).tolist()
        lines.append(json.dumps({"id": f"{row['id']}-sat", "values": values}))
    if rows:
        shape = np.asarray(rows[0]["values"]).shape
        lines += [
            json.dumps({"id": "bad-shape", "values": [[0.0] * shape[1]]}),
            '{"id": "bad-nan", "values": [[NaN]]}',
            '{"id": "bad-json", "values": [[1.0, 2.0]',
        ]
    args.out.write_text("".join(f"{s}\n" for s in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
