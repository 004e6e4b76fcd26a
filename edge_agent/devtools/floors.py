"""The floors the benchmark holds the agent to, measured in the same run.

* ``floor_onnx`` — the raw runtime: ``InferenceSession.run`` of the pack's graph on
  prepared arrays, one window and 64 at a time (what any integration pays at least).
* ``json_floor`` — what any integration that takes JSON lines pays at least: each JSON
  parser available here timed alone on the same lines (to Python objects; on to the model's
  float32 input array; and with the checks of the reading contract, which a parser alone
  does not make: numbers only, the shape, finite values), and the fastest validating one
  followed by the raw run, one line and 64 lines at a time.

The floors and the agent's paths are timed together, in turn (``measure.interleaved``), so
that the ratios the budgets check compare figures taken at the same moments.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from edge_agent.devtools.measure import Spec, group_count, raw_session, sample_count, timed
from edge_agent.ingest import readings as readings_module
from edge_agent.ingest.readings import ReadingDecoder
from edge_agent.models.pack import ModelPack

Parser = Callable[[bytes], Any]


def floor_onnx(pack: ModelPack, x: np.ndarray, passes: int) -> dict[str, Spec]:
    """The raw runtime: session.run on prepared arrays, batch 1 ("single") and batch 64
    ("batched"); the paths to time (``measure.interleaved``)."""
    sess = raw_session(pack)
    m = pack.manifest
    outs = [m.outputs.probs] if m.outputs is not None else None
    name = m.input.name
    singles = [x[i : i + 1].copy() for i in range(len(x))]
    for s in singles[:10]:
        sess.run(outs, {name: s})
    it = itertools.cycle(singles)
    # Each batch run on another prepared batch (8 of them), as each micro-batch is new readings.
    whole = np.concatenate([x] * max(1, 64 // len(x) + 1))
    bigs = [np.ascontiguousarray(np.roll(whole, 5 * k, axis=0)[:64]) for k in range(8)]
    sess.run(outs, {name: bigs[0]})
    itb = itertools.cycle(bigs)
    return {
        "single": Spec(lambda: sess.run(outs, {name: next(it)}), sample_count(len(x), passes)),
        "batched": Spec(lambda: sess.run(outs, {name: next(itb)}), group_count(len(x), passes), 64),
    }


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


def _validating(shape: tuple[int, ...]) -> dict[str, Callable[[bytes], np.ndarray]]:
    """The reading decoder (every check of the reading contract: types, shape, finite),
    with the orjson path where orjson is installed and without it."""
    strict = ReadingDecoder(shape)
    strict._fast = False
    out = {"msgspec, validated": lambda line: strict.decode(line).values}
    if readings_module._orjson_loads is not None:
        fast = ReadingDecoder(shape)
        out["orjson, validated"] = lambda line: fast.decode(line).values
    return out


def json_floor(
    pack: ModelPack, lines: list[bytes], passes: int
) -> tuple[dict[str, Any], dict[str, Spec]]:
    """Each parser alone; each into the model's input array, without and with the checks of
    the reading contract (timed here, one after another: they only pick the fastest). Then
    the JSON floor's paths to time (``measure.interleaved``): the fastest validating parser +
    the raw run, per line ("single") and 64 lines at a time ("batched")."""
    n = sample_count(len(lines), passes)
    out: dict[str, Any] = {"parse": {}, "to_array": {}, "validated": {}}

    def each(fn: Callable[[bytes], Any]) -> dict[str, Any]:
        it = itertools.cycle(lines)
        return timed(lambda: fn(next(it)), n)

    for name, parse in parsers().items():
        out["parse"][name] = each(parse)
        out["to_array"][name] = each(_to_array(name, parse))
    validating = _validating(tuple(pack.manifest.input.shape))
    for name, fn in validating.items():
        out["validated"][name] = each(fn)
    out["fastest_parse"] = min(out["parse"], key=lambda k: out["parse"][k]["p50_ms"])
    out["fastest_to_array"] = min(out["to_array"], key=lambda k: out["to_array"][k]["p50_ms"])
    best = min(out["validated"], key=lambda k: out["validated"][k]["p50_ms"])
    out["fastest_validated"] = best
    to_array = validating[best]
    sess = raw_session(pack)
    m = pack.manifest
    outs = [m.outputs.probs] if m.outputs is not None else None
    name = m.input.name
    it = itertools.cycle(lines)
    group = (lines * (64 // len(lines) + 1))[:64]
    n_groups = group_count(len(lines), passes) // 2  # a JSON batch is ~10x a frame batch
    specs = {
        "single": Spec(lambda: sess.run(outs, {name: to_array(next(it))[np.newaxis]}), n),
        "batched": Spec(
            lambda: sess.run(outs, {name: np.stack([to_array(line) for line in group])}),
            n_groups,
            64,
        ),
    }
    return out, specs
