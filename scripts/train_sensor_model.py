"""Train the BasicMotions model packs and write the sensor data files, deterministically.

What it does
------------
1. Loads the real BasicMotions dataset (UEA/UCR archive) that sktime ships offline
   (``sktime.datasets.load_basic_motions``; 40 train + 40 test windows of 6 channels x 100
   samples, 4 classes). Values are rounded to 7 significant digits first, exactly as they are
   written to ``data/basicmotions/*.jsonl``, so every number below is reproducible from the
   shipped data files.
2. Builds per-channel window features (mean, std, min, max, mean absolute first difference,
   RMS of a 3-point moving average of the centred signal; the cloud model adds the
   accelerometer and gyroscope magnitudes as two more signals and a 9-point smoothing), trains
   small MLPs with scikit-learn on a deterministically augmented training split (Gaussian noise
   at several levels relative to each channel's std, amplitude scaling, circular time shifts),
   as a bag of members whose averaged logits fold exactly into one wider MLP.
3. Fits temperature scaling on out-of-fold predictions (stratified k-fold on the train split),
   chooses the routing thresholds and the raw-value out-of-distribution guard by stated rules.
4. Writes each model as one ONNX graph (built here with ``onnx.helper``; opset 17) that takes
   the raw window ``window`` [N, 6, 100] and returns ``logits`` [N, 4], ``probs`` [N, 4]
   (softmax of logits / T) and ``feature_z`` [N] (max absolute standardised feature).
5. Quantizes the edge model to int8 both dynamically (``quantize_dynamic``) and statically
   (``quantize_static``, QDQ, MinMax calibration on clean + augmented training windows of all
   four classes, restricted to MatMul/Gemm inputs so the scoring tail stays fp32). Keeps the
   variant that matches the fp32 test accuracy and is batch-invariant (dynamic quantization
   scales activations per call, so a window's confidence depends on what it is batched with),
   then the faster one at batch 1; both accuracies and the choice go into the manifest.
6. Adds the out-of-distribution guard to the edge packs' graphs (``scripts/graph_guard.py``;
   they are then version 1.1.0, the cloud pack 1.0.0).
7. Writes ``models/basicmotions-int8`` (default), ``models/basicmotions-fp32``,
   ``models/basicmotions-cloud`` (each ``model.onnx`` + ``manifest.toml``) and
   ``data/basicmotions/{train,test}.jsonl`` + ``README.md``, then prints a summary: accuracies,
   ECE, thresholds, ``session.run`` latency at batch 1 on one thread and the noisy-window check.

Running it twice with the same ``--seed`` gives byte-identical model and data files (latencies
are printed only, never written).

How to run
----------
    pip install -e '.[train]'          # sktime, scikit-learn, onnx (onnxruntime is a dependency)
    python scripts/train_sensor_model.py [--out-models models] [--out-data data] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier

from edge_agent.scoring.backends.onnx import open_session
from edge_agent.util.files import file_sha256

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_guard import upgrade_pack  # the sibling script, importable as a module

log = logging.getLogger("train_sensor_model")

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

LABELS = ("badminton", "running", "standing", "walking")
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z")
N_CHANNELS = 6
N_SAMPLES = 100
OPSET = 17
IR_VERSION = 8
#: The edge packs' version: 1.1.0 since their graphs compute the guard (scripts/graph_guard.py).
EDGE_GUARD_VERSION = "1.1.0"
SIG_DIGITS = 7

# Augmentation: every training window gets AUG_COPIES transformed copies. Copy k gets Gaussian
# noise with std AUG_NOISE_LEVELS[k % len] x the channel's std over the whole train split, an
# amplitude factor log-uniform in [1/AUG_SCALE, AUG_SCALE] (times a per-channel factor in
# [1 - AUG_CHANNEL_JITTER, 1 + AUG_CHANNEL_JITTER]) and a uniformly random circular time shift.
AUG_NOISE_LEVELS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0)
AUG_COPIES = 140
AUG_SCALE = 1.5
AUG_CHANNEL_JITTER = 0.05
OOF_FOLDS = 5
OOF_COPIES = 70  # augmented copies of every held-out window in the out-of-fold evaluation set

# Routing rules.
TARGET_ACCEPTED_ACCURACY = 0.998
THRESHOLD_GRID = tuple(round(0.5 + 0.005 * i, 3) for i in range(100))  # 0.500 ... 0.995
Z_MARGIN = 1.25
RANGE_MARGIN = 0.5
SATURATION_FACTOR = 10.0

# The noisy-window check on the test split.
CHECK_NOISE_LEVELS = (0.5, 1.0, 2.0)
CHECK_DRAWS = 10

# Quantization choice: an int8 variant qualifies if it keeps the fp32 test accuracy and is
# batch-invariant (a test window's confidence scored alone and inside the whole test batch differ
# by at most BATCH_TOLERANCE; dynamic quantization scales activations per call, so it is not);
# among qualifiers the faster at batch 1 wins, by at least SPEED_MARGIN, else static is kept.
BATCH_TOLERANCE = 1e-4
SPEED_MARGIN = 0.05
TIMING_RUNS = 3000
TIMING_ROUNDS = 5


@dataclass(frozen=True)
class FeatureSpec:
    """Which signals the graph summarises and which smoothing widths it uses."""

    magnitudes: bool  # add |acc| and |gyr| as two more signals
    smooth: tuple[int, ...]  # moving-average widths for the low-pass RMS statistics

    @property
    def n_signals(self) -> int:
        return N_CHANNELS + (2 if self.magnitudes else 0)

    @property
    def stat_names(self) -> tuple[str, ...]:
        return ("mean", "std", "min", "max", "mad1", *(f"lp{k}_rms" for k in self.smooth))

    @property
    def n_features(self) -> int:
        return self.n_signals * len(self.stat_names)


@dataclass(frozen=True)
class ModelSpec:
    """One model family: features, MLP shape of each bagged member, regularisation."""

    key: str
    features: FeatureSpec
    hidden: tuple[int, ...]
    members: int
    alpha: float


EDGE = ModelSpec("edge", FeatureSpec(magnitudes=False, smooth=(3,)), (16,), 5, 1e-2)
CLOUD = ModelSpec("cloud", FeatureSpec(magnitudes=True, smooth=(3, 9)), (64, 32), 5, 1e-1)


@dataclass
class TrainedModel:
    """Standardisation constants and the folded MLP (averaged logits of the members)."""

    spec: ModelSpec
    mu: F64
    sd: F64
    weights: list[F64]
    biases: list[F64]
    z_train_max: float  # max feature_z over the model's own (augmented) training windows

    def standardise(self, x: F64) -> F64:
        return (features(x, self.spec.features) - self.mu) / self.sd

    def logits(self, x: F64) -> F64:
        h = self.standardise(x)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < last:
                h = np.maximum(h, 0.0)
        return h


@dataclass
class Outputs:
    """What a model returns for a batch of windows."""

    logits: F64
    probs: F64
    feature_z: F64


# ----------------------------------------------------------------------------- data


def round_sig(x: F64) -> F64:
    """Round to SIG_DIGITS significant digits, exactly as the JSONL files store the values."""
    flat = [float(format(v, f".{SIG_DIGITS}g")) for v in x.ravel().tolist()]
    return np.asarray(flat, dtype=np.float64).reshape(x.shape)


def load_split(split: str) -> tuple[F64, I64]:
    from sktime.datasets import load_basic_motions  # noqa: PLC0415 - slow import, train only

    x, y = load_basic_motions(split=split, return_type="numpy3D")
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1:] != (N_CHANNELS, N_SAMPLES):
        raise ValueError(f"unexpected BasicMotions shape {x.shape}")
    labels = np.asarray([LABELS.index(str(v).lower()) for v in y], dtype=np.int64)
    return round_sig(x), labels


def _num(v: float) -> str:
    s = format(v, f".{SIG_DIGITS}g")
    return s if any(c in s for c in ".en") else s + ".0"


def write_jsonl(path: Path, prefix: str, x: F64, y: I64) -> None:
    lines = []
    for i, (window, label) in enumerate(zip(x, y, strict=True)):
        rows = ",".join("[" + ",".join(_num(v) for v in row.tolist()) + "]" for row in window)
        lines.append(
            f'{{"id": "{prefix}-{i:03d}", "label": "{LABELS[int(label)]}", "values": [{rows}]}}'
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- features


def signals(x: F64, spec: FeatureSpec) -> F64:
    if not spec.magnitudes:
        return x
    acc = np.sqrt((x[:, 0:3] ** 2).sum(axis=1, keepdims=True))
    gyr = np.sqrt((x[:, 3:6] ** 2).sum(axis=1, keepdims=True))
    return np.concatenate([x, acc, gyr], axis=1)


def features(x: F64, spec: FeatureSpec) -> F64:
    """Numpy twin of the graph's feature block: [N, signals x stats], signal-major."""
    s = signals(x, spec)
    mean = s.mean(axis=2)
    centred = s - mean[:, :, None]
    stats = [
        mean,
        np.sqrt((centred**2).mean(axis=2)),
        s.min(axis=2),
        s.max(axis=2),
        np.abs(np.diff(s, axis=2)).mean(axis=2),
    ]
    for k in spec.smooth:
        smooth = np.lib.stride_tricks.sliding_window_view(centred, k, axis=2).mean(axis=3)
        stats.append(np.sqrt((smooth**2).mean(axis=2)))
    return np.stack(stats, axis=2).reshape(len(x), -1)


# ----------------------------------------------------------------------------- training


def augment(
    x: F64, y: I64, copies: int, ref_std: F64, rng: np.random.Generator
) -> tuple[F64, I64, F64]:
    """Clean windows followed by ``copies`` transformed copies; also each row's noise level."""
    n = len(x)
    xs, ys, levels = [x], [y], [np.zeros(n)]
    t = np.arange(N_SAMPLES)
    for k in range(copies):
        level = AUG_NOISE_LEVELS[k % len(AUG_NOISE_LEVELS)]
        log_scale = math.log(AUG_SCALE)
        scale = np.exp(rng.uniform(-log_scale, log_scale, (n, 1, 1))) * rng.uniform(
            1 - AUG_CHANNEL_JITTER, 1 + AUG_CHANNEL_JITTER, (n, N_CHANNELS, 1)
        )
        shift = rng.integers(0, N_SAMPLES, n)
        idx = (t[None, :] - shift[:, None]) % N_SAMPLES
        rolled = np.take_along_axis(x, np.broadcast_to(idx[:, None, :], x.shape), axis=2)
        noise = rng.normal(size=x.shape) * (level * ref_std)[None, :, None]
        xs.append(rolled * scale + noise)
        ys.append(y)
        levels.append(np.full(n, level))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(levels)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def train_model(x: F64, y: I64, spec: ModelSpec, ref_std: F64, seed: int, tag: int) -> TrainedModel:
    """Bag of ``spec.members`` MLPs on independent augmentations, folded into one MLP."""
    sets = [augment(x, y, AUG_COPIES, ref_std, _rng(seed, tag, m))[:2] for m in range(spec.members)]
    feats = [features(xa, spec.features) for xa, _ in sets]
    stacked = np.concatenate(feats)
    mu = stacked.mean(axis=0)
    sd = np.maximum(stacked.std(axis=0), 1e-6)
    member_w: list[list[F64]] = []
    member_b: list[list[F64]] = []
    for m, ((_, ya), f) in enumerate(zip(sets, feats, strict=True)):
        clf = MLPClassifier(
            hidden_layer_sizes=spec.hidden,
            alpha=spec.alpha,
            max_iter=3000,
            random_state=int(_rng(seed, tag, m, 1).integers(2**31 - 1)),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit((f - mu) / sd, ya)
        if list(clf.classes_) != list(range(len(LABELS))):
            raise RuntimeError("a training set is missing a class")
        member_w.append([np.asarray(w, dtype=np.float64) for w in clf.coefs_])
        member_b.append([np.asarray(b, dtype=np.float64) for b in clf.intercepts_])
    weights, biases = fold_members(member_w, member_b)
    z = np.abs((stacked - mu) / sd).max(axis=1)
    return TrainedModel(spec, mu, sd, weights, biases, float(z.max()))


def fold_members(
    member_w: list[list[F64]], member_b: list[list[F64]]
) -> tuple[list[F64], list[F64]]:
    """Members side by side: hidden layers block-diagonal, output layer = mean of the logits."""
    k = len(member_w)
    n_layers = len(member_w[0])
    weights: list[F64] = []
    biases: list[F64] = []
    for layer in range(n_layers):
        ws = [mw[layer] for mw in member_w]
        bs = [mb[layer] for mb in member_b]
        if layer == 0:
            w = np.concatenate(ws, axis=1)
        else:
            rows = sum(m.shape[0] for m in ws)
            cols = sum(m.shape[1] for m in ws) if layer < n_layers - 1 else ws[0].shape[1]
            w = np.zeros((rows, cols))
            r = c = 0
            for m in ws:
                if layer < n_layers - 1:
                    w[r : r + m.shape[0], c : c + m.shape[1]] = m
                    c += m.shape[1]
                else:
                    w[r : r + m.shape[0], :] = m / k
                r += m.shape[0]
        b = np.concatenate(bs) if layer < n_layers - 1 else np.mean(bs, axis=0)
        weights.append(w)
        biases.append(b)
    return weights, biases


# ----------------------------------------------------------------------------- calibration


def softmax(logits: F64, temperature: float = 1.0) -> F64:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ece(probs: F64, y: I64, bins: int = 10) -> float:
    """Expected calibration error with equal-width confidence bins."""
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
    """Grid search (log-spaced) for the NLL-minimising temperature, rounded to 4 digits."""
    grid = 10.0 ** np.linspace(-1.5, 1.5, 3001)
    rows = np.arange(len(y))
    nll = [-np.log(softmax(logits, t)[rows, y] + 1e-300).mean() for t in grid]
    return float(f"{grid[int(np.argmin(nll))]:.4g}")


def choose_threshold(conf: F64, correct: npt.NDArray[np.bool_]) -> float:
    for t in THRESHOLD_GRID:
        accepted = conf >= t
        if accepted.any() and correct[accepted].mean() >= TARGET_ACCEPTED_ACCURACY:
            return t
    return THRESHOLD_GRID[-1]


@dataclass
class OofResult:
    logits: F64
    y: I64
    levels: F64
    temperature: float
    threshold: float
    ece_before: float
    ece_after: float
    accuracy_clean: float
    accuracy_all: float


def out_of_fold(x: F64, y: I64, spec: ModelSpec, ref_std: F64, seed: int) -> OofResult:
    folds = StratifiedKFold(n_splits=OOF_FOLDS, shuffle=True, random_state=seed)
    all_logits, all_y, all_levels = [], [], []
    for fold, (tr, te) in enumerate(folds.split(x, y)):
        model = train_model(x[tr], y[tr], spec, ref_std, seed, 100 + fold)
        xe, ye, le = augment(x[te], y[te], OOF_COPIES, ref_std, _rng(seed, 200 + fold))
        all_logits.append(model.logits(xe))
        all_y.append(ye)
        all_levels.append(le)
        log.info("%s: fold %d/%d done", spec.key, fold + 1, OOF_FOLDS)
    logits = np.concatenate(all_logits)
    yy = np.concatenate(all_y)
    levels = np.concatenate(all_levels)
    temperature = fit_temperature(logits, yy)
    probs = softmax(logits, temperature)
    correct = probs.argmax(axis=1) == yy
    return OofResult(
        logits=logits,
        y=yy,
        levels=levels,
        temperature=temperature,
        threshold=choose_threshold(probs.max(axis=1), correct),
        ece_before=ece(softmax(logits), yy),
        ece_after=ece(probs, yy),
        accuracy_clean=float(correct[levels == 0].mean()),
        accuracy_all=float(correct.mean()),
    )


# ----------------------------------------------------------------------------- ONNX graph


def _const(name: str, value: npt.ArrayLike, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name=name)


def _mlp_head(
    model: TrainedModel,
    temperature: float,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
) -> None:
    """z -> MLP logits -> probs = softmax(logits / T), appended to ``nodes`` and ``inits``."""
    # The MLP reads z through an Identity so that quantization (which rewires the consumers of
    # a quantized tensor) never touches the feature_z branch; ORT removes the Identity.
    nodes.append(helper.make_node("Identity", ["z"], ["h0"]))
    h = "h0"
    last = len(model.weights) - 1
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        inits.append(_const(f"W{i + 1}", w))
        inits.append(_const(f"b{i + 1}", b))
        nodes.append(helper.make_node("MatMul", [h, f"W{i + 1}"], [f"mm{i + 1}"]))
        out = "logits" if i == last else f"pre{i + 1}"
        nodes.append(helper.make_node("Add", [f"mm{i + 1}", f"b{i + 1}"], [out]))
        if i < last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i + 1}"]))
            h = f"h{i + 1}"
    inits.append(_const("inv_temperature", 1.0 / temperature))
    nodes.append(helper.make_node("Mul", ["logits", "inv_temperature"], ["logits_t"]))
    nodes.append(helper.make_node("Softmax", ["logits_t"], ["probs"], axis=1))


def build_graph(model: TrainedModel, temperature: float, doc: str) -> onnx.ModelProto:
    """Raw window -> features -> standardised z -> MLP logits; probs = softmax(logits / T)."""
    fs = model.spec.features
    c = fs.n_signals
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def red(op: str, src: str, dst: str, axis: int = 2, keep: int = 1) -> None:
        nodes.append(helper.make_node(op, [src], [dst], axes=[axis], keepdims=keep))

    src = "window"
    if fs.magnitudes:
        inits.append(_const("split_33", [3, 3], np.int64))
        nodes.append(helper.make_node("Split", ["window", "split_33"], ["acc", "gyr"], axis=1))
        red("ReduceL2", "acc", "acc_mag", axis=1)
        red("ReduceL2", "gyr", "gyr_mag", axis=1)
        nodes.append(helper.make_node("Concat", ["window", "acc_mag", "gyr_mag"], ["sig"], axis=1))
        src = "sig"
    red("ReduceMean", src, "f_mean")
    nodes.append(helper.make_node("Sub", [src, "f_mean"], ["centred"]))
    red("ReduceL2", "centred", "f_std")
    red("ReduceMin", src, "f_min")
    red("ReduceMax", src, "f_max")
    inits.append(_const("k_diff", np.tile([[[-1.0, 1.0]]], (c, 1, 1))))
    nodes.append(helper.make_node("Conv", [src, "k_diff"], ["diff1"], group=c))
    red("ReduceL1", "diff1", "f_mad1")
    stats = ["f_mean", "f_std", "f_min", "f_max", "f_mad1"]
    scale = [1.0, 1.0 / math.sqrt(N_SAMPLES), 1.0, 1.0, 1.0 / (N_SAMPLES - 1)]
    for k in fs.smooth:
        inits.append(_const(f"k_ma{k}", np.full((c, 1, k), 1.0 / k)))
        nodes.append(helper.make_node("Conv", ["centred", f"k_ma{k}"], [f"ma{k}"], group=c))
        red("ReduceL2", f"ma{k}", f"f_lp{k}")
        stats.append(f"f_lp{k}")
        scale.append(1.0 / math.sqrt(N_SAMPLES - k + 1))
    nodes.append(helper.make_node("Concat", stats, ["stats"], axis=2))
    nodes.append(helper.make_node("Flatten", ["stats"], ["feat_raw"], axis=1))
    # z = (raw * scale - mu) / sd = raw * (scale / sd) + (-mu / sd)
    inits.append(_const("z_mul", np.tile(scale, c) / model.sd))
    inits.append(_const("z_add", -model.mu / model.sd))
    nodes.append(helper.make_node("Mul", ["feat_raw", "z_mul"], ["z_scaled"]))
    nodes.append(helper.make_node("Add", ["z_scaled", "z_add"], ["z"]))
    nodes.append(helper.make_node("Abs", ["z"], ["z_abs"]))
    red("ReduceMax", "z_abs", "feature_z", axis=1, keep=0)
    _mlp_head(model, temperature, nodes, inits)
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        f"basicmotions_{model.spec.key}",
        [helper.make_tensor_value_info("window", f32, ["batch", N_CHANNELS, N_SAMPLES])],
        [
            helper.make_tensor_value_info("logits", f32, ["batch", len(LABELS)]),
            helper.make_tensor_value_info("probs", f32, ["batch", len(LABELS)]),
            helper.make_tensor_value_info("feature_z", f32, ["batch"]),
        ],
        initializer=inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edge-agent scripts/train_sensor_model.py",
        producer_version="1",
        ir_version=IR_VERSION,
        doc_string=doc,
    )
    helper.set_model_props(proto, {"labels": ",".join(LABELS)})
    onnx.checker.check_model(proto, full_check=True)
    return proto


# ----------------------------------------------------------------------------- ONNX Runtime


def session(path: Path) -> ort.InferenceSession:
    """The runtime's own ONNX session (one thread, no spinning, full optimisation)."""
    return open_session(path)


def run(sess: ort.InferenceSession, x: F64) -> Outputs:
    logits, probs, z = sess.run(["logits", "probs", "feature_z"], {"window": x.astype(np.float32)})
    return Outputs(
        np.asarray(logits, np.float64), np.asarray(probs, np.float64), np.asarray(z, np.float64)
    )


def median_latency_us(sessions: dict[str, ort.InferenceSession], x1: F64) -> dict[str, float]:
    """Median session.run wall time at batch 1, interleaving the models round by round."""
    feed = {"window": x1.astype(np.float32)}
    samples: dict[str, list[int]] = {k: [] for k in sessions}
    for sess in sessions.values():
        for _ in range(300):
            sess.run(None, feed)
    for _ in range(TIMING_ROUNDS):
        for key, sess in sessions.items():
            times = samples[key]
            for _ in range(TIMING_RUNS // TIMING_ROUNDS):
                t0 = time.perf_counter_ns()
                sess.run(None, feed)
                times.append(time.perf_counter_ns() - t0)
    return {k: statistics.median(v) / 1000.0 for k, v in samples.items()}


class WindowReader(CalibrationDataReader):
    """Calibration batches for quantize_static."""

    def __init__(self, x: F64, batch: int = 256) -> None:
        self._batches = iter(
            [{"window": x[i : i + batch].astype(np.float32)} for i in range(0, len(x), batch)]
        )

    def get_next(self) -> dict[str, F32] | None:
        return next(self._batches, None)


def quantize(fp32_path: Path, out_dir: Path, calib: F64) -> dict[str, Path]:
    dyn = out_dir / "int8_dynamic.onnx"
    sta = out_dir / "int8_static.onnx"
    quantize_dynamic(
        fp32_path,
        dyn,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=False,
        weight_type=QuantType.QInt8,
    )
    quantize_static(
        fp32_path,
        sta,
        WindowReader(calib),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=False,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # Only the MatMul inputs (activations, weights) are quantized; their outputs and the
        # scoring tail (bias add, temperature, softmax) stay fp32.
        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
    )
    return {"dynamic": dyn, "static": sta}


# ----------------------------------------------------------------------------- OOD guard


@dataclass
class OodParams:
    channel_min: list[float]
    channel_max: list[float]
    range_margin: float
    dead_channel_std: float
    saturation_fraction: float


def ood_params(x_train: F64) -> OodParams:
    """Raw-value guard; the rules are stated in the manifest's routing.rule."""
    lo = x_train.min(axis=(0, 2))
    hi = x_train.max(axis=(0, 2))
    min_std = float(x_train.std(axis=2).min())
    dead = 10.0 ** math.floor(math.log10(min_std / 10.0))
    wmax = x_train.max(axis=2, keepdims=True)
    wmin = x_train.min(axis=2, keepdims=True)
    at_extreme = np.maximum((x_train == wmax).mean(axis=2), (x_train == wmin).mean(axis=2))
    sat = min(0.5, round(float(at_extreme.max()) * SATURATION_FACTOR, 3))
    return OodParams([float(v) for v in lo], [float(v) for v in hi], RANGE_MARGIN, dead, sat)


def guard_reasons(x: F64, p: OodParams) -> list[str | None]:
    """Mirror of the runtime's OodCheck (float32, same order of checks)."""
    x32 = x.astype(np.float32)
    lo = np.asarray(p.channel_min, np.float32)
    hi = np.asarray(p.channel_max, np.float32)
    span = hi - lo
    lower = lo - p.range_margin * span
    upper = hi + p.range_margin * span
    xmin = x32.min(axis=2)
    xmax = x32.max(axis=2)
    dead = (x32.std(axis=2) < p.dead_channel_std).any(axis=1)
    oor = ((xmin < lower) | (xmax > upper)).any(axis=1)
    at_max = (x32 == xmax[:, :, None]).mean(axis=2)
    at_min = (x32 == xmin[:, :, None]).mean(axis=2)
    frac = p.saturation_fraction
    sat = ((xmax > xmin) & ((at_max > frac) | (at_min > frac))).any(axis=1)
    out: list[str | None] = []
    for d, o, s in zip(dead, oor, sat, strict=True):
        out.append("dead_sensor" if d else "out_of_range" if o else "saturated" if s else None)
    return out


# ----------------------------------------------------------------------------- manifest


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"non-finite float {v!r} in a manifest")
        return repr(v)
    if isinstance(v, str):
        out = []
        for ch in v:
            if ch in {'"', "\\"}:
                out.append("\\" + ch)
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(e) for e in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def toml_doc(top: dict[str, Any], tables: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, body in tables:
        lines.append("")
        lines.append(f"[[{name[2:-2]}]]" if name.startswith("[[") else f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
    return "\n".join(lines) + "\n"


def sig(v: float, digits: int = 4) -> float:
    """Round for a manifest: ``digits`` significant digits, always a finite float."""
    return float(f"{v:.{digits}g}")


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- packs


@dataclass
class Variant:
    """One ONNX file of a model family and what it scored on the test split."""

    path: Path
    out: Outputs
    accuracy: float
    batch_delta: float  # max |confidence alone - confidence in the whole test batch|


@dataclass
class Family:
    """A trained model family: OOF calibration, final model, fp32 and int8 variants."""

    spec: ModelSpec
    oof: OofResult
    model: TrainedModel
    z_max: float
    variants: dict[str, Variant]
    choice: str = ""
    choice_reason: str = ""


def choose_quantization(fam: Family, latency: dict[str, float]) -> tuple[str, str]:
    """Apply the rule described at BATCH_TOLERANCE; returns (variant, reason)."""
    v = fam.variants
    keeps = [k for k in ("dynamic", "static") if v[k].accuracy == v["fp32"].accuracy]
    invariant = [k for k in keeps if v[k].batch_delta <= BATCH_TOLERANCE]
    facts = (
        "static = QDQ int8 on the MatMul inputs only (weights and activations, MinMax-calibrated"
        " on clean + augmented train windows of all 4 classes), bias/temperature/softmax fp32;"
        " dynamic = quantize_dynamic on MatMul;"
        f" test accuracy fp32 {v['fp32'].accuracy:.3f}, dynamic {v['dynamic'].accuracy:.3f},"
        f" static {v['static'].accuracy:.3f}; max confidence change between scoring a test window"
        f" alone and in the {len(v['fp32'].out.probs)}-window batch: dynamic"
        f" {v['dynamic'].batch_delta:.4f}, static {v['static'].batch_delta:.4f}"
    )
    rule = "rule: keep the fp32 accuracy, be batch-invariant (<= 1e-4), then the faster at batch 1"
    if len(invariant) == 1:
        return invariant[0], (
            f"{invariant[0]}: {facts}; only {invariant[0]} keeps the fp32 accuracy and is"
            f" batch-invariant ({rule})"
        )
    pool = invariant or keeps
    if len(pool) == 2:
        fast, slow = sorted(pool, key=lambda k: latency[k])
        if latency[slow] > latency[fast] * (1 + SPEED_MARGIN):
            return fast, f"{fast}: {facts}; {fast} was the faster at batch 1 ({rule})"
        return "static", f"static: {facts}; latencies within {SPEED_MARGIN:.0%} ({rule})"
    if len(pool) == 1:
        return pool[0], f"{pool[0]}: {facts}; only {pool[0]} keeps the fp32 accuracy ({rule})"
    best = max(("static", "dynamic"), key=lambda k: v[k].accuracy)
    return best, f"{best}: {facts}; neither keeps the fp32 accuracy, {best} is closer ({rule})"


def feature_text(fs: FeatureSpec) -> str:
    sig = (
        "the 6 channels plus the accelerometer and gyroscope magnitudes (8 signals)"
        if fs.magnitudes
        else "each of the 6 channels"
    )
    smooth = " and ".join(f"{k}-point" for k in fs.smooth)
    return (
        f"raw sensor values in; inside the graph, for {sig} over the {N_SAMPLES} samples: mean,"
        f" std, min, max, mean absolute first difference, RMS of the {smooth} moving average of"
        f" the centred signal ({len(fs.stat_names)} x {fs.n_signals} = {fs.n_features} features,"
        " signal-major), each standardised with the mean/std of the augmented training windows"
        " (constants in the graph)"
    )


def architecture_text(spec: ModelSpec) -> str:
    widths = [h * spec.members for h in spec.hidden]
    chain = " -> ".join(f"{w} relu" for w in widths)
    member = "-".join(str(h) for h in spec.hidden)
    return (
        f"window [6, 100] -> {spec.features.n_features} features -> standardise -> {chain} ->"
        f" {len(LABELS)} logits; the hidden layers are {spec.members} bagged MLPs of {member}"
        f" units (scikit-learn MLPClassifier, Adam, L2 alpha {spec.alpha:g}), each trained on its"
        " own augmentation, folded into one graph (block-diagonal, logits averaged)"
    )


def augmentation_text() -> str:
    levels = ", ".join(f"{v:g}" for v in AUG_NOISE_LEVELS)
    return (
        f"{AUG_COPIES} copies of every training window next to the clean one: Gaussian noise"
        f" at {levels} x the channel's std over the train split (cycled), amplitude x"
        f" log-uniform[1/{AUG_SCALE:g}, {AUG_SCALE:g}] x per-channel"
        f" U[{1 - AUG_CHANNEL_JITTER:g}, {1 + AUG_CHANNEL_JITTER:g}], circular time shift"
        f" U{{0..{N_SAMPLES - 1}}}; seeded numpy Generator, one independent draw per bagged member"
    )


def rule_text() -> str:
    levels = ", ".join(f"{v:g}" for v in AUG_NOISE_LEVELS)
    return (
        f"confidence_threshold: smallest t in 0.500, 0.505, ..., 0.995 at which at least"
        f" {TARGET_ACCEPTED_ACCURACY:.1%} of the out-of-fold predictions with temperature-scaled"
        f" max prob >= t are correct ({OOF_FOLDS}-fold stratified CV on the train split; each"
        f" held-out window clean plus {OOF_COPIES} augmented copies: noise {levels} x channel"
        " std, scaling, time shifts). feature_z_max: max feature_z over the final model's"
        f" clean + augmented training windows x {Z_MARGIN:g}, rounded up to 0.1. ood:"
        " channel_min/max = per-channel min/max over the clean train windows, range_margin"
        f" {RANGE_MARGIN:g}; dead_channel_std = 10^floor(log10(smallest per-window channel std"
        f" in train / 10)); saturation_fraction = {SATURATION_FACTOR:g} x the largest fraction of"
        " a clean train window's samples sitting at that window's own max or min (capped at"
        " 0.5). No clean train or test window trips any of these."
    )


def write_pack(
    out_dir: Path,
    name: str,
    fam: Family,
    variant: str,
    ood: OodParams,
    y_test: I64,
    seed: int,
    description: str,
) -> None:
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    v = fam.variants[variant]
    model_path = folder / "model.onnx"
    shutil.copyfile(v.path, model_path)
    top = {
        "schema_version": 1,
        "name": name,
        "version": "1.0.0",
        "backend": "onnx",
        "description": description,
        "default": name == "basicmotions-int8",
        "labels": list(LABELS),
    }
    tables = [
        *_model_tables(model_path, fam, v, y_test),
        *_record_tables(fam, variant, ood, y_test, seed),
    ]
    text = toml_doc(top, tables)
    (folder / "manifest.toml").write_text(text, encoding="utf-8")
    if fam.spec is EDGE:
        # The edge packs carry their out-of-distribution guard inside the graph (issue 17);
        # the graph changed, so they are 1.1.0.
        upgrade_pack(folder, EDGE_GUARD_VERSION)
    check_manifest(folder)


def _choice_text(fam: Family, variant: str) -> str:
    """Why the pack ships this variant (the manifest's ``quantization_choice``)."""
    if variant in ("dynamic", "static"):
        return fam.choice_reason
    if fam.spec is EDGE:
        return (
            f"none: fp32 reference of the edge model; basicmotions-int8 ships the {fam.choice}"
            f" int8 variant ({fam.choice_reason})"
        )
    return (
        "none: the cloud tier runs fp32; int8 variants were measured for reference only"
        f" (the edge rule would pick {fam.choice}; {fam.choice_reason})"
    )


def _model_tables(
    model_path: Path, fam: Family, v: Variant, y_test: I64
) -> list[tuple[str, dict[str, Any]]]:
    """The manifest's tables about the model: its file, input, outputs, calibration, routing."""
    return [
        (
            "[[files]]",
            {
                "path": "model.onnx",
                "sha256": file_sha256(model_path),
                "size": model_path.stat().st_size,
            },
        ),
        (
            "input",
            {
                "name": "window",
                "shape": [N_CHANNELS, N_SAMPLES],
                "dtype": "float32",
                "channels": list(CHANNELS),
                "normalisation": feature_text(fam.spec.features),
            },
        ),
        ("outputs", {"probs": "probs", "logits": "logits", "feature_z": "feature_z"}),
        (
            "calibration",
            {
                "method": "temperature",
                "temperature": fam.oof.temperature,
                "ece_before_oof": sig(fam.oof.ece_before),
                "ece_after_oof": sig(fam.oof.ece_after),
                "ece_before_test": sig(ece(softmax(v.out.logits), y_test)),
                "ece_after_test": sig(ece(v.out.probs, y_test)),
            },
        ),
        (
            "routing",
            {
                "confidence_threshold": fam.oof.threshold,
                "feature_z_max": fam.z_max,
                "rule": rule_text(),
            },
        ),
    ]


def _record_tables(
    fam: Family, variant: str, ood: OodParams, y_test: I64, seed: int
) -> list[tuple[str, dict[str, Any]]]:
    """The manifest's tables about the data: OOD limits, test metrics, how it was trained."""
    v = fam.variants[variant]
    acc = {k: vv.accuracy for k, vv in fam.variants.items()}
    conf = v.out.probs.max(axis=1)
    return [
        (
            "ood",
            {
                "channel_min": ood.channel_min,
                "channel_max": ood.channel_max,
                "range_margin": ood.range_margin,
                "dead_channel_std": ood.dead_channel_std,
                "saturation_fraction": ood.saturation_fraction,
            },
        ),
        (
            "metrics",
            {
                "accuracy_test": sig(v.accuracy),
                "accuracy_test_fp32": sig(acc["fp32"]),
                "accuracy_test_int8": sig(acc[fam.choice]),
                "accuracy_test_int8_dynamic": sig(acc["dynamic"]),
                "accuracy_test_int8_static": sig(acc["static"]),
                "quantization": variant if variant in ("dynamic", "static") else "none",
                "quantization_choice": _choice_text(fam, variant),
                "test_windows": len(y_test),
                "hard_rate_test": sig(float((conf < fam.oof.threshold).mean())),
            },
        ),
        (
            "training",
            {
                "dataset": "BasicMotions (UEA archive), as shipped offline by sktime 1.2.0",
                "script": "scripts/train_sensor_model.py",
                "seed": seed,
                "train_windows": N_TRAIN,
                "augmentation": augmentation_text(),
                "architecture": architecture_text(fam.spec),
            },
        ),
    ]


def check_manifest(folder: Path) -> None:
    with open(folder / "manifest.toml", "rb") as fh:
        m = tomllib.load(fh)
    for entry in m["files"]:
        target = folder / entry["path"]
        if target.stat().st_size != entry["size"] or file_sha256(target) != entry["sha256"]:
            raise RuntimeError(f"{folder}: manifest does not match {entry['path']}")


@dataclass
class NoisyResult:
    level: float
    relative_to: str  # "train" (channel std over the train split) or "window" (its own std)
    windows: int
    correct: int
    handled: int  # correct, or flagged by probs max < threshold or feature_z > feature_z_max
    guard: int  # tripped a raw-value guard (the runtime would route these hard as well)
    handled_with_guard: int
    max_wrong_conf: float  # highest max-prob among misclassified windows not flagged by feature_z


def noisy_check(
    sess: ort.InferenceSession,
    x: F64,
    y: I64,
    ref_std: F64,
    fam: Family,
    ood: OodParams,
    seed: int,
) -> list[NoisyResult]:
    """Gaussian noise at CHECK_NOISE_LEVELS x each channel's std, CHECK_DRAWS draws per window.

    Two readings of "each channel's std": the channel's std over the train split (the same
    absolute noise for every window) and the window's own per-channel std (the same
    signal-to-noise ratio for every window). Windows are scored one at a time, as on the edge
    (dynamic int8 quantizes activations per call).
    """
    results = []
    for relative_to in ("train", "window"):
        rng = _rng(seed, 7777 if relative_to == "train" else 7778)
        for level in CHECK_NOISE_LEVELS:
            draws = []
            for _ in range(CHECK_DRAWS):
                std = (
                    ref_std[None, :, None] if relative_to == "train" else x.std(axis=2)[:, :, None]
                )
                draws.append(x + rng.normal(size=x.shape) * level * std)
            xn = np.concatenate(draws)
            yn = np.tile(y, CHECK_DRAWS)
            outs = [run(sess, xn[i : i + 1]) for i in range(len(xn))]
            probs = np.concatenate([o.probs for o in outs])
            z = np.concatenate([o.feature_z for o in outs])
            conf = probs.max(axis=1)
            correct = probs.argmax(axis=1) == yn
            flagged = (conf < fam.oof.threshold) | (z > fam.z_max)
            guarded = np.asarray([g is not None for g in guard_reasons(xn, ood)])
            results.append(
                NoisyResult(
                    level,
                    relative_to,
                    len(yn),
                    int(correct.sum()),
                    int((correct | flagged).sum()),
                    int(guarded.sum()),
                    int((correct | flagged | guarded).sum()),
                    float(conf[~correct & (z <= fam.z_max)].max(initial=0.0)),
                )
            )
    return results


# ----------------------------------------------------------------------------- data README


def data_readme(x: F64, y: I64, xt: F64, yt: I64, ref_std: F64) -> str:
    def balance(labels: I64) -> str:
        counts = np.bincount(labels, minlength=len(LABELS))
        return ", ".join(f"{n} {lab}" for lab, n in zip(LABELS, counts.tolist(), strict=True))

    rows = "\n".join(
        f"| {i} | `{ch}` | {kind} | {x[:, i].min():.4g} | {x[:, i].max():.4g} | {ref_std[i]:.4g} |"
        for i, (ch, kind) in enumerate(
            zip(CHANNELS, ["accelerometer"] * 3 + ["gyroscope"] * 3, strict=True)
        )
    )
    return f"""# BasicMotions sensor windows

Real smartwatch motion data: the **BasicMotions** problem of the UEA & UCR time series
classification archive (<https://www.timeseriesclassification.com/description.php?Dataset=BasicMotions>),
as shipped offline inside the sktime 1.2.0 package
(`sktime/datasets/data/BasicMotions/BasicMotions_{{TRAIN,TEST}}.ts`, loaded with
`sktime.datasets.load_basic_motions(split=..., return_type="numpy3D")`). Nothing was downloaded.

From the archive's description: four students performed four activities (walking, resting,
running, badminton) wearing a smart watch that records a 3-D accelerometer and a 3-D gyroscope;
each activity was recorded five times, sampled every tenth of a second for ten seconds (10 Hz,
100 samples). The archive's class "Standing" is the resting activity. Archive reference:
A. Bagnall et al., "The UEA multivariate time series classification archive, 2018",
arXiv:1811.00075. The `.ts` files state no licence of their own; cite the archive when you use
the data.

## Files

| file | windows | classes |
|---|---|---|
| `train.jsonl` | {len(y)} (ids `train-000` ...) | {balance(y)} |
| `test.jsonl` | {len(yt)} (ids `test-000` ...) | {balance(yt)} |

The split is the archive's own train/test split, in the archive's order. One JSON object per
line: `{{"id": "test-000", "label": "walking", "values": [[100 floats], ... 6 rows]}}`; `values`
is channel-major, 6 channels x 100 samples, the shape the model packs' `input.shape` names.
`label` is one of the packs' `labels` (lower case, sorted). Values are written with at most
{SIG_DIGITS} significant digits (the archive has 6 decimals, so this rounds at most the last
digit of the larger values); the models were trained and evaluated on exactly these rounded
values.

## Channels

| row | name | sensor | train min | train max | train std |
|---|---|---|---|---|---|
{rows}

Units are not documented by the archive. The accelerometer values average about zero while
standing still, so gravity appears to have been removed; treat both sensors' units as
device units.

## How it was produced

`python scripts/train_sensor_model.py` (see its docstring) loads both splits from sktime,
rounds them to {SIG_DIGITS} significant digits and writes these files; the same run trains the
model packs in `models/`. The output is deterministic.
"""


# ----------------------------------------------------------------------------- main


N_TRAIN = 40


@dataclass
class PackResult:
    name: str
    path: Path
    accuracy: float
    hard_rate: float
    ece_before_test: float
    ece_after_test: float
    z_test_max: float
    noisy: list[NoisyResult]


def build_family(
    spec: ModelSpec,
    x: F64,
    y: I64,
    xt: F64,
    yt: I64,
    ref_std: F64,
    seed: int,
    tmp: Path,
) -> Family:
    log.info("%s: out-of-fold training (%d folds)", spec.key, OOF_FOLDS)
    oof = out_of_fold(x, y, spec, ref_std, seed)
    log.info("%s: final training", spec.key)
    model = train_model(x, y, spec, ref_std, seed, 0)
    z_max = math.ceil(model.z_train_max * Z_MARGIN * 10.0) / 10.0
    proto = build_graph(
        model,
        oof.temperature,
        f"BasicMotions {spec.key} model: window [N,6,100] -> logits, probs, feature_z",
    )
    fp32 = tmp / f"{spec.key}_fp32.onnx"
    fp32.write_bytes(proto.SerializeToString())
    qdir = tmp / f"{spec.key}_q"
    qdir.mkdir()
    calib, _, _ = augment(x, y, len(AUG_NOISE_LEVELS) * 2, ref_std, _rng(seed, 300))
    paths = {"fp32": fp32, **quantize(fp32, qdir, calib)}
    variants = {}
    for key, path in paths.items():
        sess = session(path)
        out = run(sess, xt)
        single = np.concatenate([run(sess, xt[i : i + 1]).probs for i in range(len(xt))])
        if not np.array_equal(single.argmax(axis=1), out.probs.argmax(axis=1)):
            log.warning("%s %s: batch-1 and batch-%d predictions differ", spec.key, key, len(xt))
        variants[key] = Variant(
            path,
            out,
            float((out.probs.argmax(axis=1) == yt).mean()),
            float(np.abs(single.max(axis=1) - out.probs.max(axis=1)).max()),
        )
    ref = model.logits(xt)
    drift = float(np.abs(variants["fp32"].out.logits - ref).max())
    if drift > 1e-3:
        raise RuntimeError(f"{spec.key}: ONNX fp32 logits differ from numpy by {drift}")
    return Family(spec, oof, model, z_max, variants)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out-models", type=Path, default=Path("models"))
    ap.add_argument("--out-data", type=Path, default=Path("data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # onnxruntime.quantization logs advice and per-tensor notes on the root logger.
    logging.getLogger().handlers[0].addFilter(
        lambda rec: (
            not any(
                part in rec.getMessage()
                for part in ("pre-processing", "Quantization parameters for tensor")
            )
        )
    )
    seed: int = args.seed

    x, y = load_split("train")
    xt, yt = load_split("test")
    if len(x) != N_TRAIN:
        raise RuntimeError(f"expected {N_TRAIN} training windows, got {len(x)}")
    ref_std = x.transpose(1, 0, 2).reshape(N_CHANNELS, -1).std(axis=1)

    data_dir = args.out_data / "basicmotions"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "train.jsonl", "train", x, y)
    write_jsonl(data_dir / "test.jsonl", "test", xt, yt)
    (data_dir / "README.md").write_text(data_readme(x, y, xt, yt, ref_std), encoding="utf-8")

    ood = ood_params(x)
    for split, xs in (("train", x), ("test", xt)):
        tripped = [g for g in guard_reasons(xs, ood) if g is not None]
        if tripped:
            raise RuntimeError(f"clean {split} windows trip the OOD guard: {tripped}")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        edge = build_family(EDGE, x, y, xt, yt, ref_std, seed, tmp)
        cloud = build_family(CLOUD, x, y, xt, yt, ref_std, seed, tmp)
        log.info("timing session.run at batch 1")
        sessions = {
            f"{fam.spec.key}_{k}": session(v.path)
            for fam in (edge, cloud)
            for k, v in fam.variants.items()
        }
        latency = median_latency_us(sessions, xt[:1])
        for fam in (edge, cloud):
            lat = {k: latency[f"{fam.spec.key}_{k}"] for k in fam.variants}
            fam.choice, fam.choice_reason = choose_quantization(fam, lat)

        packs = _packs(edge, cloud)
        results = [
            _write_and_check(args.out_models, pack, ood, xt, yt, ref_std, seed) for pack in packs
        ]
        print_summary(edge, cloud, ood, latency, results, args)
    # The [drift] reference (per-channel window statistics of the train split) goes at the end
    # of each manifest; the model files are not touched (scripts/drift_reference.py).
    import drift_reference  # noqa: PLC0415 - a sibling script, imported when it is needed

    train_jsonl = data_dir / "train.jsonl"
    folders = [args.out_models / name for name, *_ in packs]
    drift_reference.write(
        [drift_reference.open_pack(f) for f in folders], train_jsonl, drift_reference.BINS, False
    )
    return 0


def _packs(edge: Family, cloud: Family) -> list[tuple[str, Family, str, str]]:
    """The packs written: name, model family, variant, description."""
    return [
        (
            "basicmotions-int8",
            edge,
            edge.choice,
            "BasicMotions activity classifier for the edge (default): small MLP on 36"
            f" per-channel window features, int8 ({edge.choice} quantization)",
        ),
        (
            "basicmotions-fp32",
            edge,
            "fp32",
            "BasicMotions activity classifier for the edge: the same small MLP in fp32",
        ),
        (
            "basicmotions-cloud",
            cloud,
            "fp32",
            "BasicMotions activity classifier for the cloud tier: larger 2-layer MLP on"
            f" {CLOUD.features.n_features} window features incl. acc/gyr magnitudes, fp32",
        ),
    ]


def _write_and_check(
    out_models: Path,
    pack: tuple[str, Family, str, str],
    ood: OodParams,
    xt: F64,
    yt: I64,
    ref_std: F64,
    seed: int,
) -> PackResult:
    """Write one pack and measure it as shipped (noisy test windows included)."""
    name, fam, variant, description = pack
    write_pack(out_models, name, fam, variant, ood, yt, seed, description)
    v = fam.variants[variant]
    sess = session(out_models / name / "model.onnx")
    return PackResult(
        name,
        out_models / name,
        v.accuracy,
        float((v.out.probs.max(axis=1) < fam.oof.threshold).mean()),
        ece(softmax(v.out.logits), yt),
        ece(v.out.probs, yt),
        float(v.out.feature_z.max()),
        noisy_check(sess, xt, yt, ref_std, fam, ood, seed),
    )


def print_summary(
    edge: Family,
    cloud: Family,
    ood: OodParams,
    latency: dict[str, float],
    results: list[PackResult],
    args: argparse.Namespace,
) -> None:
    print("\n=== BasicMotions model packs ===")
    for fam in (edge, cloud):
        o = fam.oof
        acc = ", ".join(
            f"{k} {v.accuracy:.3f} (batch-1 vs batch-40 max |d conf| {v.batch_delta:.4f})"
            for k, v in fam.variants.items()
        )
        lat = ", ".join(f"{k} {latency[f'{fam.spec.key}_{k}']:.1f}" for k in fam.variants)
        print(f"[{fam.spec.key}] {architecture_text(fam.spec)}")
        print(f"  test accuracy: {acc}")
        print(f"  session.run median us at batch 1, 1 thread: {lat}")
        print(f"  int8 choice: {fam.choice} ({fam.choice_reason})")
        print(
            f"  OOF: accuracy clean {o.accuracy_clean:.4f}, clean+augmented {o.accuracy_all:.4f}"
            f" ({len(o.y)} windows); temperature {o.temperature:g};"
            f" ECE {o.ece_before:.4f} -> {o.ece_after:.4f}"
        )
        print(
            f"  routing: confidence_threshold {o.threshold:g}, feature_z_max {fam.z_max:g}"
            f" (training max {fam.model.z_train_max:.3f})"
        )
    print(
        f"OOD guard: range margin {ood.range_margin:g}, dead_channel_std"
        f" {ood.dead_channel_std:g}, saturation_fraction {ood.saturation_fraction:g};"
        " clean train/test windows tripping it: 0"
    )
    for res in results:
        print(
            f"{res.name}: test accuracy {res.accuracy:.3f}, hard rate {res.hard_rate:.3f},"
            f" ECE test {res.ece_before_test:.4f} -> {res.ece_after_test:.4f},"
            f" max feature_z on test {res.z_test_max:.2f}"
        )
        for n in res.noisy:
            print(
                f"  noise {n.level:g}x channel std ({n.relative_to}): {n.handled}/{n.windows}"
                f" ({n.handled / n.windows:.2%}) correct or flagged by threshold/feature_z;"
                f" correct {n.correct / n.windows:.2%}; raw guard tripped {n.guard};"
                f" incl. raw guard {n.handled_with_guard / n.windows:.2%};"
                f" highest confidence of a wrong answer {n.max_wrong_conf:.3f}"
            )
    print(f"wrote {args.out_models}/basicmotions-{{int8,fp32,cloud}}, {args.out_data}/basicmotions")


if __name__ == "__main__":
    raise SystemExit(main())
