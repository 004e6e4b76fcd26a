"""The floors the benchmark holds the agent to, measured in the same run.

* ``floor_onnx`` — the raw runtime: ``InferenceSession.run`` of the pack's graph on
  prepared arrays, one window and 64 at a time (what any integration pays at least).
* ``json_floor`` — what any integration that takes JSON lines pays at least: each JSON
  parser available here timed alone on the same lines (to Python objects, and on to the
  model's float32 input array), and the fastest of them followed by the raw run, one line
  and 64 lines at a time.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from edge_agent.devtools.measure import raw_session, timed
from edge_agent.models.pack import ModelPack

Parser = Callable[[bytes], Any]


def floor_onnx(pack: ModelPack, x: np.ndarray, passes: int) -> dict[str, Any]:
    """The raw runtime: session.run on prepared arrays, batch 1 and batch 64."""
    sess = raw_session(pack)
    m = pack.manifest
    outs = [m.outputs.probs] if m.outputs is not None else None
    name = m.input.name
    singles = [x[i : i + 1] for i in range(len(x))]
    for s in singles[:10]:
        sess.run(outs, {name: s})
    it = iter(singles * passes)
    single = timed(lambda: sess.run(outs, {name: next(it)}), len(singles) * passes)
    big = np.concatenate([x] * max(1, 64 // len(x) + 1))[:64]
    sess.run(outs, {name: big})
    n_batches = max(10, passes * len(x) // 64)
    batch = timed(lambda: sess.run(outs, {name: big}), n_batches)
    batch["throughput_per_s"] = 64 * n_batches / (batch["mean_ms"] * n_batches / 1000.0)
    batch["batch"] = 64
    return {"single": single, "batched": batch}


class _Values(msgspec.Struct):
    values: list[list[float]]


def parsers() -> dict[str, Parser]:
    """The JSON parsers available here, each from bytes to Python objects."""
    out: dict[str, Parser] = {"json.loads": json.loads, "msgspec": msgspec.json.decode}
    with contextlib.suppress(ImportError):  # optional (in the dev extra): timed when installed
        out["orjson"] = importlib.import_module("orjson").loads
    return out


def _to_array(name: str, parse: Parser) -> Callable[[bytes], np.ndarray]:
    if name == "msgspec":
        typed = msgspec.json.Decoder(_Values).decode  # straight into the field, no dict
        return lambda line: np.asarray(typed(line).values, dtype=np.float32)
    return lambda line: np.asarray(parse(line)["values"], dtype=np.float32)


def json_floor(pack: ModelPack, lines: list[bytes], passes: int) -> dict[str, Any]:
    """Each parser alone and into the input array; the fastest into the array + the raw
    run, per line and 64 lines at a time."""
    n = len(lines) * passes
    out: dict[str, Any] = {"parse": {}, "to_array": {}}
    convert: dict[str, Callable[[bytes], np.ndarray]] = {}
    for name, parse in parsers().items():
        it = iter(lines * passes)
        out["parse"][name] = timed(lambda p=parse, i=it: p(next(i)), n)  # type: ignore[misc]
        convert[name] = _to_array(name, parse)
        it = iter(lines * passes)
        out["to_array"][name] = timed(lambda c=convert[name], i=it: c(next(i)), n)  # type: ignore[misc]
    out["fastest_parse"] = min(out["parse"], key=lambda k: out["parse"][k]["p50_ms"])
    best = min(out["to_array"], key=lambda k: out["to_array"][k]["p50_ms"])
    out["fastest_to_array"] = best
    to_array = convert[best]
    sess = raw_session(pack)
    m = pack.manifest
    outs = [m.outputs.probs] if m.outputs is not None else None
    name = m.input.name
    it = iter(lines * passes)
    out["single"] = timed(lambda: sess.run(outs, {name: to_array(next(it))[np.newaxis]}), n)
    group = (lines * (64 // len(lines) + 1))[:64]
    n_groups = max(10 if passes > 3 else 1, n // 64)
    batched = timed(
        lambda: sess.run(outs, {name: np.stack([to_array(line) for line in group])}), n_groups
    )
    batched["throughput_per_s"] = 64 / (batched["mean_ms"] / 1000.0)
    batched["batch"] = 64
    out["batched"] = batched
    return out
