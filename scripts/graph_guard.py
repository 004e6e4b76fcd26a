"""Put a pack's out-of-distribution guard inside its ONNX graph.

The scorer's guard (``edge_agent.scoring.scorer.OodCheck``) checks each raw window against
the manifest's ``[ood]`` table: a dead (constant) channel, values far outside the training
range, a channel clipped at its extreme. Computed with numpy outside the graph it costs about
as much as the model itself. This script adds the same checks to the graph, next to the
per-channel reductions the model already makes, so one ``session.run`` returns the
probabilities and the guard:

* ``ood_guard`` [N] float32: 0 = nothing wrong, 1 = saturated, 2 = out_of_range,
  3 = dead_sensor; where several apply the higher wins, which is the order ``OodCheck``
  checks them in;
* the statistics it is computed from, [N, C, 1] each, named in the manifest's
  ``[outputs] guard_stats`` (minimum, maximum, spread, at-extreme): the per-channel minimum
  and maximum and the spread sqrt(sum((x - mean)^2)) = std * sqrt(samples) are the tensors
  the model already computes for its features; at-extreme is the larger of the counts of
  samples sitting at the window's own maximum or minimum (the saturation statistic).

The thresholds are the manifest's ``[ood]`` values, as graph constants computed exactly as
``OodCheck`` computes them (float32). The runtime checks at load that the graph and the
manifest agree on probe windows built from that table, and refuses the pack otherwise.

    pip install -e '.[train]'          # onnx
    python scripts/graph_guard.py models/basicmotions-int8 --version 1.1.0

rewrites ``model.onnx`` and the manifest (the file's sha256 and size, ``[outputs]``, the
version) in place; run it on a pack whose graph has no guard yet. The training script calls
``add_guard`` for the edge packs, so a retrain gives the same graph.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: The guard's output (the manifest's ``[outputs] guard``) and its statistics (``guard_stats``:
#: minimum, maximum, spread, samples at the extreme; see the module docstring).
GUARD = "ood_guard"
STAT_KEYS = ("min", "max", "spread", "at_extreme")

#: ``ood_guard`` values: the higher wins, in the order ``OodCheck`` checks the reasons.
CODES = {3.0: "dead_sensor", 2.0: "out_of_range", 1.0: "saturated"}


def _thresholds(ood: dict[str, Any], samples: int) -> dict[str, np.ndarray]:
    """The guard's limits in float32, computed as ``OodCheck.__init__`` computes them."""
    lo = np.asarray(ood["channel_min"], dtype=np.float32)
    hi = np.asarray(ood["channel_max"], dtype=np.float32)
    span = hi - lo
    margin = ood.get("range_margin", 0.5)
    dead = np.float32(ood.get("dead_channel_std", 1e-6))
    return {
        "g_lower": (lo - margin * span).astype(np.float32).reshape(-1, 1),
        "g_upper": (hi + margin * span).astype(np.float32).reshape(-1, 1),
        # std < d  <=>  sqrt(sum((x - mean)^2)) < d * sqrt(T): the spread the model computes.
        "g_dead_spread": np.asarray(dead * np.sqrt(np.float32(samples)), np.float32),
        "g_sat_limit": np.asarray(
            np.float32(ood.get("saturation_fraction", 0.2)) * np.float32(samples), np.float32
        ),
        "g_zero": np.asarray(0.0, np.float32),
        "g_axis2": np.asarray([2], np.int64),
        "g_code0": np.asarray(0.0, np.float32),
    }


class _Builder:
    """Appends nodes to a graph, reusing a node the graph already has for the same
    operation on the same inputs (the model computes per-channel min, max and spread)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []

    @staticmethod
    def _same(n: onnx.NodeProto, op: str, inputs: list[str], attrs: dict[str, Any]) -> bool:
        if n.op_type != op or list(n.input) != inputs or len(n.attribute) != len(attrs):
            return False
        have = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        return have == attrs

    def add(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        for n in [*self.graph.node, *self.nodes]:
            if self._same(n, op, inputs, attrs):
                return str(n.output[0])
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def add_guard(
    model: onnx.ModelProto, ood: dict[str, Any], input_name: str
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with the guard's outputs (module docstring) computed from the raw
    input ``input_name`` [N, C, T], and the names of the statistics outputs (in
    ``STAT_KEYS`` order). The model's own outputs are untouched. Every node costs about a
    microsecond per run on a small CPU, so the guard is written in few of them."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if any(o.name == GUARD for o in g.output):
        raise ValueError(f"the graph already has an {GUARD!r} output")
    shape = next(i for i in g.input if i.name == input_name).type.tensor_type.shape
    channels, samples = (d.dim_value for d in shape.dim[1:])
    g.initializer.extend(
        numpy_helper.from_array(v, name=k) for k, v in _thresholds(ood, samples).items()
    )
    b = _Builder(g)
    x = input_name
    keep = {"axes": [2], "keepdims": 1}
    xmin = b.add("ReduceMin", [x], "g_min", **keep)
    xmax = b.add("ReduceMax", [x], "g_max", **keep)
    mean = b.add("ReduceMean", [x], "g_mean", **keep)
    spread = b.add("ReduceL2", [b.add("Sub", [x, mean], "g_centred")], "g_spread", **keep)
    count = []
    for end, ref in (("max", xmax), ("min", xmin)):
        eq = b.add("Cast", [b.add("Equal", [x, ref], f"g_eq_{end}")], f"g_eqf_{end}", to=1)
        # ReduceSum takes its axes as an input from opset 13 on.
        count.append(b.add("ReduceSum", [eq, "g_axis2"], f"g_n_{end}", keepdims=1))
    at_extreme = b.add("Max", count, "g_at_extreme")
    flags = [
        b.add("Less", [spread, "g_dead_spread"], "g_dead"),
        b.add("Less", [xmin, "g_lower"], "g_low"),
        b.add("Greater", [xmax, "g_upper"], "g_high"),
        b.add("Greater", [at_extreme, "g_sat_limit"], "g_clipped"),
    ]
    codes = [3.0, 2.0, 2.0, 1.0]
    if float(ood.get("dead_channel_std", 1e-6)) <= 0.0:
        # A constant channel has every sample at its extremes; it is not "saturated". With a
        # positive dead limit it is dead, which outranks saturated, so the test is needed
        # only when the dead check is off.
        moving = b.add("Greater", [b.add("Sub", [xmax, xmin], "g_span"), "g_zero"], "g_moving")
        flags[3] = b.add("And", [moving, flags[3]], "g_saturated")
    g.initializer.append(numpy_helper.from_array(np.asarray(codes, np.float32), name="g_codes"))
    flag = b.add("Concat", flags, "g_flags", axis=2)
    code = b.add("Where", [flag, "g_codes", "g_code0"], "g_code")
    b.add("ReduceMax", [code], GUARD, axes=[1, 2], keepdims=0)
    g.node.extend(b.nodes)
    f32 = TensorProto.FLOAT
    g.output.append(helper.make_tensor_value_info(GUARD, f32, ["batch"]))
    stats = dict(zip(STAT_KEYS, (xmin, xmax, spread, at_extreme), strict=True))
    for name in stats.values():
        g.output.append(helper.make_tensor_value_info(name, f32, ["batch", channels, 1]))
    onnx.checker.check_model(out, full_check=True)
    return out, list(stats.values())


def _set_toml(text: str, section: str, key: str, value: str) -> str:
    """Set ``key = value`` in ``[section]`` ('' = the top level), adding the key if absent."""
    start = 0
    if section:
        m = re.search(rf"(?m)^\[{re.escape(section)}\]\n", text)
        if m is None:
            raise ValueError(f"no [{section}] table")
        start = m.end()
    nxt = re.search(r"(?m)^\[", text[start:])
    end = start + nxt.start() if nxt else len(text)
    body = text[start:end]
    line = re.compile(rf"(?m)^{re.escape(key)} = .*$")
    if line.search(body):
        body = line.sub(lambda _m: f"{key} = {value}", body, count=1)
    else:
        body = body.rstrip("\n") + f"\n{key} = {value}\n" + ("\n" if nxt else "")
    return text[:start] + body + text[end:]


def upgrade_pack(folder: Path, version: str) -> None:
    """Add the guard to the pack in ``folder``; rewrite its manifest to match."""
    manifest_path = folder / "manifest.toml"
    text = manifest_path.read_text(encoding="utf-8")
    manifest = tomllib.loads(text)
    if manifest.get("backend") != "onnx" or "ood" not in manifest:
        raise ValueError(f"{folder}: needs an onnx pack with an [ood] table")
    entry = next(f for f in manifest["files"] if f["path"].endswith(".onnx"))
    model_path = folder / entry["path"]
    model, stats = add_guard(onnx.load(str(model_path)), manifest["ood"], manifest["input"]["name"])
    data = model.SerializeToString()
    model_path.write_bytes(data)
    old = f'sha256 = "{entry["sha256"]}"\nsize = {entry["size"]}'
    new = f'sha256 = "{hashlib.sha256(data).hexdigest()}"\nsize = {len(data)}'
    if old not in text:
        raise ValueError(f"{manifest_path}: cannot find the model file's entry")
    text = text.replace(old, new, 1)
    text = _set_toml(text, "", "version", f'"{version}"')
    text = _set_toml(text, "outputs", "guard", f'"{GUARD}"')
    text = _set_toml(text, "outputs", "guard_stats", "[" + ", ".join(f'"{v}"' for v in stats) + "]")
    manifest_path.write_text(text, encoding="utf-8")


def measure(folder: Path, repeats: int = 20000) -> str:
    """What the guard costs a pack that has it in its graph, one run each way: the graph
    without the guard's nodes, with them, and the numpy guard alone, one window and 64."""
    import time  # noqa: PLC0415 - the measuring mode only

    from edge_agent.devtools.measure import load_lines, windows_of  # noqa: PLC0415
    from edge_agent.models.pack import BUNDLED_TEST_DATA, open_pack  # noqa: PLC0415
    from edge_agent.scoring.guard import OodCheck  # noqa: PLC0415

    pack = open_pack(folder)
    m = pack.manifest
    if m.outputs is None or not m.outputs.guard:
        raise ValueError(f"{folder}: no guard in the graph to measure")
    full = onnx.load(str(pack.file(next(f.path for f in m.files if f.path.endswith(".onnx")))))
    # The model's own subgraph: what its outputs need, without the guard's nodes.
    wanted = [o for o in (m.outputs.probs, m.outputs.logits, m.outputs.feature_z) if o]
    plain = onnx.utils.Extractor(full).extract_model([m.input.name], wanted)
    with_guard, without = open_session_bytes(full), open_session_bytes(plain)
    x = windows_of(load_lines(BUNDLED_TEST_DATA))
    x64 = np.ascontiguousarray(np.concatenate([x] * 2)[:64])
    guard = OodCheck(pack)
    outs = [m.outputs.probs]

    def p50(fn: Any, n: int) -> float:
        for _ in range(200):
            fn()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
        return float(np.median(samples)) / 1000.0

    rows = []
    for label, arr, n in (("1 window", x[:1].copy(), repeats), ("64 windows", x64, repeats // 20)):
        a = p50(lambda a=arr: without.run(outs, {m.input.name: a}), n)
        b = p50(lambda a=arr: with_guard.run(outs, {m.input.name: a}), n)
        c = p50(lambda a=arr: guard.reasons(a), n)
        rows.append(
            f"{pack.ref} {label}: graph without the guard {a:.1f} us, with it {b:.1f} us"
            f" (+{b - a:.1f}); the numpy guard alone {c:.1f} us (p50)"
        )
    return "\n".join(rows)


def open_session_bytes(model: onnx.ModelProto) -> Any:
    """An ONNX Runtime session of ``model`` with the runtime's own options."""
    import tempfile  # noqa: PLC0415

    from edge_agent.scoring.backends.onnx import open_session  # noqa: PLC0415

    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(model.SerializeToString())
        f.flush()
        return open_session(f.name)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packs", nargs="+", type=Path, help="pack folders to upgrade in place")
    ap.add_argument("--version", help="the packs' new version (the bytes change)")
    ap.add_argument(
        "--measure", action="store_true", help="time the guard of packs that have it (no change)"
    )
    args = ap.parse_args(argv)
    for folder in args.packs:
        if args.measure:
            sys.stdout.write(measure(folder) + "\n")
            continue
        if not args.version:
            ap.error("--version is needed to add the guard")
        upgrade_pack(folder, args.version)
        sys.stdout.write(f"{folder}: guard added, version {args.version}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
