"""The agent's latency paths: a reading that arrives alone is scored and acted on by
``Agent.act_one``, a group handed over whole by ``Agent.act_many``; both make a ``Decision``
only for a reading that needs one. What they leave behind must be what the same readings
leave when scored as one group with a ``Decision`` for every reading (the path taken when
the decisions are written out, ``Agent.route_many``): counts, the hard cases handed to the
link, the drift ring and the latency records."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from edge_agent.config import load_settings
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import resolve
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from tests.conftest import TEST_JSONL, settings_env

pytestmark = pytest.mark.integration

#: Confidence of one window scored alone (the bound single-window run) vs in a group of 80
#: (``session.run`` of the batch): the largest difference seen was 1.8e-7 (int8 pack, 5 of this
#: file's 80 readings; none with the fp32 pack; AMD EPYC), from the batch's other kernels.
#: Another CPU's kernels may round otherwise: the tolerance leaves 50x.
CONFIDENCE_TOLERANCE = 1e-5


def _lines() -> list[bytes]:
    """The bundled test windows, and each again with noise at twice the window's own spread
    (a good share of those are hard), with ids."""
    rng = np.random.default_rng(11)
    out = []
    for i, raw in enumerate(TEST_JSONL.read_bytes().splitlines()):
        values = np.asarray(json.loads(raw)["values"], dtype=np.float64)
        noisy = values + rng.normal(0.0, 2.0 * values.std(), values.shape)
        out.append(json.dumps({"id": f"r{i}", "values": values.tolist()}).encode())
        out.append(json.dumps({"id": f"n{i}", "values": noisy.tolist()}).encode())
    return out


def _agent(tmp_path: Path, name: str, policy: str) -> Agent:
    env = settings_env(
        1,  # the link is never started: what it is handed stays in its queue
        "latency-path",
        tmp_path / name,
        router_policy=policy,
        router_cooldown_s="0",
        router_max_urgent_per_minute="100000",
        router_urgent_below="0.7",
    )
    agent = Agent(load_settings(None, env=env), Scorer.open(resolve("basicmotions-int8")))
    agent.pipeline.output = False  # as ``edge-agent run`` serves
    if agent.learned is not None:
        agent.learned.rng = random.Random(5)  # the same audit draws for both agents
    return agent


def _handed(agent: Agent) -> tuple[list[tuple[Any, ...]], list[float]]:
    """What the agent handed the link, with the local confidences apart."""
    out, conf = [], []
    for cls, key, topic, payload in agent.link._queue.take():
        body = msgspec.json.decode(payload)
        local = body.get("local", {})
        conf.append(local.pop("confidence", None))
        out.append((cls, key, topic, json.dumps(body, sort_keys=True)))
    return out, conf


@pytest.mark.parametrize("policy", ["fixed", "learned"])
def test_readings_alone_and_groups_leave_what_decided_readings_leave(
    tmp_path: Path, policy: str
) -> None:
    lines = _lines()
    alone, group = _agent(tmp_path, "alone", policy), _agent(tmp_path, "group", policy)
    decided = _agent(tmp_path, "decided", policy)
    decided.pipeline.output = True  # a Decision for every reading, written out
    calls: list[int] = []
    act_one, act_many = alone.act_one, group.act_many

    def one(reading: Reading) -> bool:
        calls.append(1)
        return act_one(reading)

    def many(readings: list[Reading]) -> int:
        calls.append(len(readings))
        return act_many(readings)

    alone.pipeline.act_one = one
    group.pipeline.act_many = many
    try:
        for line in lines:
            alone.pipeline.process([line])
        group.pipeline.process(lines)
        assert decided.pipeline.process(lines).count(b"\n") == len(lines)
        # Every line took a latency path: one at a time, then in groups of at most max_batch.
        assert calls == [1] * len(lines) + [64, len(lines) - 64]
        handed_decided, conf_decided = _handed(decided)
        assert decided.pipeline.counts["hard"] > 0
        assert decided.pipeline.counts["local"] > 0 or policy == "learned"  # it explores at first
        assert decided.counters["hard_urgent"] > 0
        assert decided.counters["hard_batch"] > 0
        n = len(lines)
        d = decided.drift
        assert d._values is not None
        for agent in (alone, group):
            assert agent.pipeline.counts == decided.pipeline.counts
            assert agent.counters == decided.counters
            handed, conf = _handed(agent)
            assert handed == handed_decided
            assert np.allclose(conf, conf_decided, rtol=0, atol=CONFIDENCE_TOLERANCE)
            a = agent.drift
            assert a._n == d._n == n
            assert a._values is not None
            assert np.array_equal(a._values[:n], d._values[:n])
            assert a._hard[:n] == d._hard[:n]
            assert np.allclose(a._conf[:n], d._conf[:n], rtol=0, atol=CONFIDENCE_TOLERANCE)
            assert agent.latency.count == decided.latency.count == n
            assert agent.decision_seconds.data().count == n
    finally:
        for agent in (alone, group, decided):
            agent.close()
