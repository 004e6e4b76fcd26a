"""Check an ``edge-agent score --example`` output against the bundled test labels and the
default pack's manifest (its accuracy_test), as installed in a root.

    python scripts/deb/accuracy.py DECISIONS.jsonl BUNDLED_DIR

BUNDLED_DIR is the installed package's edge_agent/bundled. The accuracy may differ from the
manifest's only by windows close enough to a tie for another build to decide otherwise
(tests/conftest.py: assert_accuracy_within). Exit 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

TOL = 1e-5  # how far an ONNX pack's probabilities move between builds (docs/arm.md)


def main(argv: list[str]) -> int:
    decisions = [json.loads(x) for x in Path(argv[0]).read_text().splitlines() if x.strip()]
    bundled = Path(argv[1])
    truth = [
        json.loads(x)
        for x in (bundled / "data/basicmotions/test.jsonl").read_text().splitlines()
        if x.strip()
    ]
    manifest = tomllib.loads((bundled / "packs/basicmotions-int8/manifest.toml").read_text())
    expected = float(manifest["metrics"]["accuracy_test"])
    if [d.get("id") for d in decisions] != [t["id"] for t in truth]:
        print("accuracy: the decisions are not one per test window, in order")
        return 1
    right = sum(d["label"] == t["label"] for d, t in zip(decisions, truth, strict=True))
    close = sum(d["confidence"] <= 0.5 + TOL for d in decisions)
    accuracy = right / len(truth)
    ok = abs(accuracy - expected) <= close / len(truth) + 1e-9
    print(
        f"accuracy: {accuracy:.4f} on {len(truth)} windows, the manifest says {expected:.4f}"
        f" ({'ok' if ok else 'MISMATCH'})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
