"""Write a pack's golden inputs (rollout self-test) and list them in its manifest.

    python scripts/make_golden.py models/basicmotions-int8 [--n 8]

Scores the first N windows of the bundled test split with the pack itself and writes
``golden.jsonl`` ({"values", "label", "confidence"} per line) into the pack, adds it to the
manifest's ``[[files]]`` (size, sha256) and a ``[selftest]`` table. A candidate model must
reproduce these answers (label, confidence within the tolerance) before it may serve.
Deterministic: running it twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from edge_agent.ingest.readings import ReadingDecoder
from edge_agent.models.pack import BUNDLED_TEST_DATA, open_pack
from edge_agent.scoring.scorer import Scorer

TOLERANCE = 0.02


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack", type=Path)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--data", type=Path, default=BUNDLED_TEST_DATA)
    args = ap.parse_args()
    manifest_path = args.pack / "manifest.toml"
    text = manifest_path.read_text()
    # Remove what an earlier run added, so that the pack is scored as it was trained.
    text = re.sub(r'\[\[files\]\]\npath = "golden\.jsonl"\n[^\[]*', "", text)
    text = re.sub(r"\[selftest\]\n[^\[]*", "", text)
    manifest_path.write_text(text)
    scorer = Scorer.open(open_pack(args.pack))
    lines = [x for x in args.data.read_text().splitlines() if x.strip()]
    # Every label at least once: the windows are taken round-robin by class.
    by_label: dict[str, list[list[list[float]]]] = {}
    for line in lines:
        obj = json.loads(line)
        by_label.setdefault(str(obj.get("label", "")), []).append(obj["values"])
    picked: list[list[list[float]]] = []
    while len(picked) < args.n and any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label] and len(picked) < args.n:
                picked.append(by_label[label].pop(0))
    decoder = ReadingDecoder(scorer.shape, 1 << 20)
    decisions = scorer.score([decoder.from_values(v) for v in picked])
    out = "".join(
        json.dumps({"values": v, "label": d.label, "confidence": round(d.confidence, 6)}) + "\n"
        for v, d in zip(picked, decisions, strict=True)
    )
    golden = args.pack / "golden.jsonl"
    golden.write_text(out)
    data = golden.read_bytes()
    entry = (
        f'[[files]]\npath = "golden.jsonl"\nsha256 = "{hashlib.sha256(data).hexdigest()}"\n'
        f"size = {len(data)}\n\n"
    )
    table = f'[selftest]\nfile = "golden.jsonl"\nconfidence_tolerance = {TOLERANCE}\n\n'
    text = text.replace("[input]\n", entry + "[input]\n", 1)
    text = (
        text.replace("[drift]\n", table + "[drift]\n", 1)
        if "[drift]\n" in text
        else (text.rstrip("\n") + "\n\n" + table)
    )
    manifest_path.write_text(text)
    print(f"{golden}: {len(picked)} windows, labels {sorted({d.label for d in decisions})}")


if __name__ == "__main__":
    main()
