"""Write the ``[drift]`` reference of the ONNX model packs, and measure what drift monitoring sees.

What it does
------------
Without retraining and without touching any model file, for each pack (default: every pack in
``models/`` whose backend is ``onnx``):

1. reads the training split (``data/basicmotions/train.jsonl``, 40 windows);
2. computes each window's per-channel ``mean`` and ``std`` (12 features), the quantile bin edges
   of every feature over the training windows (``--bins``, default 6; edges rounded to 7
   significant digits) and the share of training windows in each bin;
3. scores the training windows with the pack's own scorer (the runtime's ``Scorer``, so the OOD
   guard and threshold apply) for the reference confidence histogram and hard-case rate;
4. replaces the ``[drift]`` table at the END of the pack's ``manifest.toml`` (appending it if
   absent) and re-reads the manifest to check it.

The output is deterministic (numpy quantiles, ONNX Runtime on the same windows).
``--check`` writes nothing and exits 1 if a manifest's ``[drift]`` differs from what would be
written (CI-friendly). ``--measure`` writes nothing and prints what the online monitor reports,
with the runtime's own ``DriftMonitor``, on a replay of the test split: the largest PSI of the
unchanged replay (every phase of a sliding window over the cyclic replay), of a replay with an
offset or a gain on one channel, and how many readings after the shift begins the flag rises.

How to run
----------
    .venv/bin/python scripts/drift_reference.py [--packs models/basicmotions-int8 ...]
    .venv/bin/python scripts/drift_reference.py --check
    .venv/bin/python scripts/drift_reference.py --measure [--window 200]
    .venv/bin/python scripts/drift_reference.py --cost --packs models/basicmotions-int8
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import timeit
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.config import DriftSettings  # noqa: E402
from edge_agent.ingest.readings import ReadingDecoder  # noqa: E402
from edge_agent.models.pack import ModelPack, discover, open_pack  # noqa: E402
from edge_agent.scoring.drift import (  # noqa: E402
    DriftMonitor,
    bin_shares,
    reference_from_windows,
)
from edge_agent.scoring.scorer import Scorer  # noqa: E402

F32 = npt.NDArray[np.float32]

STATS = ("mean", "std")
BINS = 6
#: Inner edges of the confidence histogram (7 buckets, finer near 1 where a good model lives).
CONFIDENCE_EDGES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
TRAIN = ROOT / "data" / "basicmotions" / "train.jsonl"
TEST = ROOT / "data" / "basicmotions" / "test.jsonl"
SIG = 7

_DRIFT_TABLE = re.compile(r"\n*^\[drift\]\n(?:^(?!\[).*\n?)*", re.MULTILINE)


def load_windows(path: Path, shape: tuple[int, ...]) -> F32:
    decoder = ReadingDecoder(shape)
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    return np.stack([decoder.decode(line).values for line in lines])


def _num(v: float) -> str:
    s = format(float(v), f".{SIG}g")
    return s if any(c in s for c in ".en") else s + ".0"


def _arr(values: Sequence[float]) -> str:
    return "[" + ", ".join(_num(v) for v in values) + "]"


def drift_table(pack: ModelPack, train: Path, bins: int) -> str:
    """The ``[drift]`` TOML table for ``pack`` (text, starting with the header)."""
    shape = tuple(pack.manifest.input.shape)
    x = load_windows(train, shape)
    edges, shares = reference_from_windows(x, STATS, bins, SIG)
    scorer = Scorer.open(pack)
    try:
        decoder = ReadingDecoder(shape)
        lines = [line for line in train.read_bytes().splitlines() if line.strip()]
        decisions = scorer.score([decoder.decode(line) for line in lines])
    finally:
        scorer.close()
    conf = np.asarray([[d.confidence] for d in decisions], dtype=np.float64)
    conf_shares = bin_shares(conf, np.asarray([CONFIDENCE_EDGES]))[0]
    hard = float(np.mean([d.route == "hard" for d in decisions]))
    rows = ",\n    ".join(_arr(r) for r in edges.tolist())
    props = ",\n    ".join(_arr(r) for r in shares.tolist())
    return (
        "[drift]\n"
        f'source = "{train.parent.name}/{train.name}: {len(x)} windows; per-channel window mean'
        f" and std, {bins} quantile bins; confidence and hard rate from this pack's scorer on"
        ' the same windows (scripts/drift_reference.py)"\n'
        f"windows = {len(x)}\n"
        f"stats = [{', '.join(f'{s!r}'.replace(chr(39), chr(34)) for s in STATS)}]\n"
        f"edges = [\n    {rows},\n]\n"
        f"proportions = [\n    {props},\n]\n"
        f"confidence_edges = {_arr(CONFIDENCE_EDGES)}\n"
        f"confidence_proportions = {_arr(conf_shares.tolist())}\n"
        f"hard_rate = {_num(hard)}\n"
    )


def with_table(manifest_text: str, table: str) -> str:
    """The manifest with its ``[drift]`` table replaced by ``table`` (or appended)."""
    stripped = _DRIFT_TABLE.sub("\n", manifest_text).rstrip("\n") + "\n"
    return stripped + "\n" + table


def onnx_packs() -> list[ModelPack]:
    return [p for p in discover() if p.manifest.backend == "onnx"]


def write(packs: list[ModelPack], train: Path, bins: int, check: bool) -> int:
    stale = 0
    for pack in packs:
        path = pack.path / "manifest.toml"
        text = path.read_text(encoding="utf-8")
        new = with_table(text, drift_table(pack, train, bins))
        if check:
            if new != text:
                print(f"{path}: [drift] is not up to date (run scripts/drift_reference.py)")
                stale += 1
            continue
        if new != text:
            path.write_text(new, encoding="utf-8")
        ref = open_pack(pack.path).manifest.drift
        if ref is None:
            raise RuntimeError(f"{path}: [drift] did not read back")
        print(f"{path}: [drift] {'written' if new != text else 'unchanged'}")
    return 1 if stale else 0


# ----------------------------------------------------------------------------- measuring


def _monitor(pack: ModelPack, window: int) -> DriftMonitor:
    return DriftMonitor(pack, DriftSettings(window=window))


def _max_psi(pack: ModelPack, seq: F32, window: int) -> tuple[float, str]:
    """Largest PSI over every sliding window of ``window`` readings in ``seq``."""
    mon = _monitor(pack, window)
    best = (0.0, "")
    for i, w in enumerate(seq):
        mon.record(w, 1.0, False)
        if i + 1 >= window:
            snap = mon.snapshot()
            if snap["psi_max"] > best[0]:
                best = (snap["psi_max"], snap["psi_max_feature"])
    return best


def _to_flag(pack: ModelPack, clean: F32, shifted: F32, window: int) -> int | None:
    """Readings after the shift begins (a full clean window first) until the flag rises."""
    mon = _monitor(pack, window)
    for w in clean[:window]:
        mon.record(w, 1.0, False)
    if mon.snapshot()["flag"]:
        return 0
    for i, w in enumerate(shifted):
        mon.record(w, 1.0, False)
        if mon.snapshot()["flag"]:
            return i + 1
    return None


def measure(pack: ModelPack, window: int, test: Path, train: Path) -> None:
    shape = tuple(pack.manifest.input.shape)
    xt = load_windows(test, shape)
    xtr = load_windows(train, shape)
    channels = pack.manifest.input.channels
    std = xtr.transpose(1, 0, 2).reshape(shape[0], -1).std(axis=1)
    s = DriftSettings(window=window)
    reps = window // len(xt) + 3
    cyclic = np.tile(xt, (reps, 1, 1))
    print(
        f"{pack.ref}: window {window}, psi_threshold {s.psi_threshold}, psi_clear {s.psi_clear},"
        f" epsilon {s.epsilon}; test replay {len(xt)} windows, looped"
    )
    top, name = _max_psi(pack, cyclic[: window + len(xt)], window)
    print(f"  unchanged replay: max PSI {top:.3f} ({name}) over all {len(xt)} phases")
    rng = np.random.default_rng(0)
    for noise in (0.1, 0.5, 1.0, 1.5):
        noisy = cyclic + rng.normal(size=cyclic.shape).astype(np.float32) * noise * cyclic.std(
            axis=2, keepdims=True
        )
        top, name = _max_psi(pack, noisy[: window + len(xt)], window)
        print(f"  replay with noise {noise:g} x window std: max PSI {top:.3f} ({name})")
    print("  shifted channel (offset in units of the channel's train std, or gain):")
    for kind, amounts in (("offset", (0.1, 0.25, 0.5, 1.0)), ("gain", (0.5, 0.67, 1.5, 2.0))):
        for amount in amounts:
            cells = []
            for c, ch in enumerate(channels):
                shifted = cyclic[: window * 3].copy()
                if kind == "offset":
                    shifted[:, c] += amount * std[c]
                else:
                    shifted[:, c] *= amount
                top, name = _max_psi(pack, shifted[: window + len(xt)], window)
                n = _to_flag(pack, cyclic, shifted, window)
                cells.append(f"{ch} {top:.2f}/{'-' if n is None else n}")
            print(f"    {kind} {amount:g}: PSI/readings-to-flag " + ", ".join(cells))


def cost(pack: ModelPack, test: Path) -> None:
    """Time ``record`` (scoring thread) and ``snapshot`` (telemetry thread)."""
    w = load_windows(test, tuple(pack.manifest.input.shape))[0]
    n = 200_000
    mon = _monitor(pack, DriftSettings().window)
    best = min(timeit.repeat(lambda: mon.record(w, 0.97, False), number=n, repeat=5))
    print(f"{pack.ref}: DriftMonitor.record {best / n * 1e6:.2f} us per reading")
    for window in (200, 1000, 10_000):
        mon = _monitor(pack, window)
        for _ in range(window):
            mon.record(w, 0.97, False)
        best = min(timeit.repeat(mon.snapshot, number=10, repeat=3))
        print(f"  snapshot at window {window}: {best / 10 * 1e3:.2f} ms per telemetry tick")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--packs", nargs="*", type=Path, help="pack folders (default: ONNX packs)")
    ap.add_argument("--train", type=Path, default=TRAIN)
    ap.add_argument("--test", type=Path, default=TEST)
    ap.add_argument("--bins", type=int, default=BINS)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    ap.add_argument("--measure", action="store_true", help="print what the monitor sees")
    ap.add_argument("--cost", action="store_true", help="time record and snapshot")
    ap.add_argument("--window", type=int, default=DriftSettings().window)
    args = ap.parse_args(argv)
    packs = [open_pack(p) for p in args.packs] if args.packs else onnx_packs()
    if args.measure:
        logging.getLogger("edge_agent.scoring.drift").setLevel(
            logging.ERROR
        )  # the flag's log lines
        for pack in packs:
            measure(pack, args.window, args.test, args.train)
        return 0
    if args.cost:
        logging.getLogger("edge_agent.scoring.drift").setLevel(logging.ERROR)
        for pack in packs:
            cost(pack, args.test)
        return 0
    return write(packs, args.train, args.bins, args.check)


if __name__ == "__main__":
    raise SystemExit(main())
