"""How far a llama.cpp pack moves from one build of llama.cpp to another (docs/arm.md).

The LLM pack's decision is a function of the window's text only; its floats are not. Every
build of llama.cpp (another CPU's kernels, another compiler, another architecture) sums in
another order, and small differences grow through the model's 30 layers. This script measures
that, with the build that the Python bindings load (``LLAMA_CPP_LIB_PATH``, see
scripts/llm_builds.sh; unset: the installed one):

    python scripts/llm_crossbuild.py dump NAME [--pack DIR] [--out DIR]
        last-token hidden states of every distinct text of the pack's encoding over the test
        split and the training windows with the training script's augmented copies, into
        DIR/NAME.npz (default DIR: ~/.cache/edge-agent-llm-builds/hidden), with the build's
        llama.cpp system info. scripts/train_llm_head.py --builds DIR fits on all of them.

    python scripts/llm_crossbuild.py texts FILE [--pack DIR]
        the same texts into a JSON file, for ``dump --texts FILE`` where the training script's
        dependencies are missing (the aarch64 build under qemu, scripts/arm_check.sh).

    python scripts/llm_crossbuild.py compare [--pack DIR] [--dir DIR] [--reference NAME]
        per build: test accuracy, routed hard, and against the reference build the label and
        route agreement, the largest confidence difference and the largest relative L2
        difference of the hidden states, with the pack's own head, temperature and threshold.
        --json writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from edge_agent.models.pack import ModelPack, open_pack
from edge_agent.scoring.backends.llama_cpp import ENCODINGS, LlamaRunner, WindowEncoding

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PACK = REPO / "models" / "smollm2-basicmotions"
DEFAULT_DIR = Path.home() / ".cache" / "edge-agent-llm-builds" / "hidden"
DATA = REPO / "data" / "basicmotions"

F64 = npt.NDArray[np.float64]


def load_split(split: str) -> tuple[F64, list[str]]:
    rows = [json.loads(x) for x in (DATA / f"{split}.jsonl").read_text().splitlines() if x.strip()]
    return np.asarray([r["values"] for r in rows], np.float64), [r["label"] for r in rows]


def all_windows(seed: int = 0) -> F64:
    """Every window scripts/train_llm_head.py encodes: train, test, augmented copies."""
    sys.path.insert(0, str(REPO / "scripts"))
    import train_llm_head as t  # noqa: PLC0415 - a sibling script, imported on demand

    data = t.load_data(REPO / "data")
    return t.all_windows(data.x_train, data.y_train, data.x_test, data.ref_std, seed)


def texts_of(encoding: WindowEncoding, x: F64) -> list[str]:
    return [encoding.text(w) for w in x]


def all_texts(pack: ModelPack) -> list[str]:
    spec = pack.manifest.llama
    if spec is None:
        raise SystemExit(f"{pack.path} is not a llama_cpp pack")
    return sorted(set(texts_of(ENCODINGS[spec.encoding], all_windows())))


def dump(name: str, pack: ModelPack, out: Path, texts_file: Path | None) -> Path:
    spec = pack.manifest.llama
    if spec is None:
        raise SystemExit(f"{pack.path} is not a llama_cpp pack")
    texts = json.loads(texts_file.read_text()) if texts_file else all_texts(pack)
    runner = LlamaRunner.for_pack(pack, spec)
    try:
        hidden = np.stack([runner.hidden(t) for t in texts])
    finally:
        runner.close()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.npz"
    info = llama_cpp.llama_print_system_info().decode()
    np.savez(
        path,
        texts=np.asarray(texts),
        hidden=hidden,
        system_info=np.asarray(info),
        lib=np.asarray(os.environ.get("LLAMA_CPP_LIB_PATH", "installed")),
        model=np.asarray(spec.model),
        prefix=np.asarray(spec.prefix),
        encoding=np.asarray(spec.encoding),
    )
    print(f"{path}: {len(texts)} texts, {info.strip()}")
    return path


def load_dump(path: Path) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, str]]:
    with np.load(path) as z:
        table = dict(zip(z["texts"].tolist(), z["hidden"], strict=True))
        meta = {k: str(z[k]) for k in ("system_info", "lib", "model")}
    return table, meta


def decide(pack: ModelPack, hidden: F64) -> tuple[F64, npt.NDArray[np.int64], F64]:
    """Probabilities, labels and confidences as the backend computes them from hidden states."""
    spec = pack.manifest.llama
    assert spec is not None
    head = np.load(pack.file(spec.head)).astype(np.float64)
    t = pack.manifest.calibration.temperature if pack.manifest.calibration else 1.0
    logits = (hidden @ head[:-1] + head[-1]) / t
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return p, p.argmax(axis=1), p.max(axis=1)


def compare(pack: ModelPack, folder: Path, reference: str) -> list[dict[str, Any]]:
    spec = pack.manifest.llama
    assert spec is not None
    enc = ENCODINGS[spec.encoding]
    x_test, truth = load_split("test")
    texts = texts_of(enc, x_test)
    y = np.asarray([pack.manifest.labels.index(t) for t in truth])
    threshold = pack.manifest.routing.confidence_threshold
    builds = sorted(folder.glob("*.npz"), key=lambda p: (p.stem != reference, p.stem))
    rows: list[dict[str, Any]] = []
    ref: dict[str, Any] = {}
    for path in builds:
        table, meta = load_dump(path)
        if meta["model"] != spec.model or any(t not in table for t in texts):
            print(
                f"{path.name}: another model or texts ({meta['model']}); skipped", file=sys.stderr
            )
            continue
        h = np.stack([table[t] for t in texts]).astype(np.float64)
        _, label, conf = decide(pack, h)
        hard = conf < threshold
        row: dict[str, Any] = {
            "build": path.stem,
            "system_info": meta["system_info"].strip(),
            "accuracy": float((label == y).mean()),
            "hard": int(hard.sum()),
            "windows": len(y),
        }
        if not ref:
            ref = {"label": label, "hard": hard, "conf": conf, "h": h, "build": path.stem}
        rel = np.linalg.norm(h - ref["h"], axis=1) / np.linalg.norm(ref["h"], axis=1)
        row |= {
            "reference": ref["build"],
            "labels_agree": int((label == ref["label"]).sum()),
            "routes_agree": int((hard == ref["hard"]).sum()),
            "max_conf_diff": float(np.abs(conf - ref["conf"]).max()),
            "max_hidden_rel_l2": float(rel.max()),
            "min_margin_to_threshold": float(np.abs(conf - threshold).min()),
        }
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("name")
    d.add_argument("--pack", type=Path, default=DEFAULT_PACK)
    d.add_argument("--out", type=Path, default=DEFAULT_DIR)
    d.add_argument("--texts", type=Path, help="the texts (from `texts`), e.g. under emulation")
    t = sub.add_parser("texts")
    t.add_argument("file", type=Path)
    t.add_argument("--pack", type=Path, default=DEFAULT_PACK)
    c = sub.add_parser("compare")
    c.add_argument("--pack", type=Path, default=DEFAULT_PACK)
    c.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    c.add_argument("--reference", default="native")
    c.add_argument("--json", type=Path)
    args = ap.parse_args()
    pack = open_pack(args.pack)
    if args.cmd == "dump":
        dump(args.name, pack, args.out, args.texts)
        return 0
    if args.cmd == "texts":
        args.file.write_text(json.dumps(all_texts(pack)) + "\n")
        return 0
    rows = compare(pack, args.dir, args.reference)
    head = ("build", "accuracy", "hard", "labels agree", "routes agree", "max conf diff")
    print("| " + " | ".join(head) + " | max hidden rel L2 |")
    print("|---" * (len(head) + 1) + "|")
    for r in rows:
        print(
            f"| {r['build']} | {r['accuracy']:.3f} | {r['hard']}/{r['windows']} |"
            f" {r['labels_agree']}/{r['windows']} | {r['routes_agree']}/{r['windows']} |"
            f" {r['max_conf_diff']:.4f} | {r['max_hidden_rel_l2']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
