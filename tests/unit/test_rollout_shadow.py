"""The shadow comparison and the pointer, without a broker (fake backend pack)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import RolloutSettings, load_settings
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import open_pack
from edge_agent.models.release import keygen
from edge_agent.models.store import ModelStore, Pointer
from edge_agent.rollout.machine import Rollout
from edge_agent.rollout.trial import Bounds, Shadow
from edge_agent.scoring.scorer import Decision, Scorer
from edge_agent.wire.messages import SCHEMA_VERSION, ModelEvent, Verdict
from tests.conftest import make_fake_pack


def bounds(**over: float) -> Bounds:
    cfg = RolloutSettings()
    values = {name: getattr(cfg, name) for name in Bounds.__slots__}
    values.update(over)
    values["shadow_readings"] = int(values["shadow_readings"])
    values["min_cloud_verdicts"] = int(values["min_cloud_verdicts"])
    values["health_readings"] = int(values["health_readings"])
    return Bounds(**values)


def decision(seq: int, live_label: str) -> Decision:
    # fake backend: the candidate answers label index values[0][0] ("a") with confidence 0.9
    reading = Reading(values=np.array([[0, 0.9, 0, 0], [0, 0, 0, 0]], dtype=np.float32), seq=seq)
    return Decision(live_label, 0.9, "hard", None, "live@1", 0.1, reading)


def verdict(seq: int, label: str) -> Verdict:
    return Verdict(
        v=SCHEMA_VERSION,
        key=f"d:{seq}",
        device="d",
        seq=seq,
        label=label,
        confidence=0.99,
        model="cloud@1",
        tier="urgent",
    )


@pytest.mark.parametrize(("cloud_label", "rejected"), [("a", False), ("b", True)])
def test_shadow_compares_both_models_with_cloud_verdicts(
    tmp_path: Path, cloud_label: str, rejected: bool
) -> None:
    """Live says "b", the candidate "a"; the cloud's verdicts decide which one is right.
    Verdicts come before and after the shadow scored their reading."""
    candidate = Scorer.open(open_pack(make_fake_pack(tmp_path / "pack")))
    shadow = Shadow(candidate, bounds(shadow_readings=40, min_agreement=0.0), 100)
    for seq in range(20):  # verdicts that arrive before the shadow scores their reading
        shadow.on_verdict(verdict(seq, cloud_label))
    for seq in range(40):
        shadow.offer(decision(seq, "b"))
    shadow.start()
    assert shadow.done.wait(10)
    for seq in range(20, 40):  # and after
        shadow.on_verdict(verdict(seq, cloud_label))
    f = shadow.figures()
    assert f["cloud_verdicts"] == 40
    assert f["cloud_agreement_candidate"] == (1.0 if cloud_label == "a" else 0.0)
    assert f["cloud_agreement_live"] == (0.0 if cloud_label == "a" else 1.0)
    assert bool(shadow.verdict()) is rejected
    if rejected:
        assert "cloud" in shadow.verdict()
    shadow.stop()
    candidate.close()


def test_no_verdict_answers_are_not_compared(tmp_path: Path) -> None:
    candidate = Scorer.open(open_pack(make_fake_pack(tmp_path / "pack")))
    shadow = Shadow(candidate, bounds(), 10)
    empty = Verdict(
        v=SCHEMA_VERSION,
        key="d:1",
        device="d",
        seq=1,
        label="",
        confidence=0.0,
        model="cloud@1",
        tier="urgent",
        no_verdict="deadline",
    )
    shadow.on_verdict(empty)
    assert shadow.cloud == 0
    candidate.close()


def test_pointer_is_replaced_whole_and_a_broken_one_falls_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.read_pointer() == Pointer()
    store.write_pointer(Pointer(live="p-2.0.0-abc", probation=True, committed={"p": "1.0.0"}))
    assert store.read_pointer().live == "p-2.0.0-abc"
    assert not (store.root / "current.json.tmp").exists()
    store.pointer_path.write_bytes(b"{not json")
    assert store.read_pointer() == Pointer()  # the configured pack serves
    pack, _ = store.live_pack()
    assert pack is None


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


#: Base64 text, so that statements get as far as their signature check.
b64 = st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode())


def _rollout(tmp: Path) -> tuple[Rollout, list[ModelEvent]]:
    events: list[ModelEvent] = []
    pack = make_fake_pack(tmp / "pack")
    keys = tmp / "state" / "trusted-keys"
    if not keys.is_dir():  # a device that trusts a key: statements get their signature checked
        keys.mkdir(parents=True)
        keygen(tmp / "release.key", keys / "release.pub")
    settings = load_settings(None, env={"EDGE_AGENT_DEVICE_STATE_DIR": str(tmp / "state")})
    live = Scorer.open(open_pack(pack))
    return Rollout(settings, ModelStore(tmp / "state"), live, report=events.append), events


def _outside(tmp: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``tmp`` but outside the state directory, with its size and mtime."""
    found = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_relative_to(tmp / "state"):
            continue
        st = p.lstat()
        found[str(p.relative_to(tmp))] = (st.st_size, st.st_mtime_ns)
    return found


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.binary(max_size=300)
    | json_like.map(lambda o: json.dumps(o).encode())
    | st.fixed_dictionaries(
        {"v": st.integers(), "action": st.sampled_from(["install", "status", "x"])},
        optional={
            "path": st.text(max_size=30),
            "statement": st.text(max_size=40) | b64,
            "signature": st.text(max_size=40) | b64,
            "request_id": st.text(max_size=10),
        },
    ).map(lambda o: json.dumps(o).encode())
)
def test_any_model_command_or_chunk_is_refused_or_counted_never_raises(
    tmp_path: Path, payload: bytes
) -> None:
    """Bad input on cmd/model and cmd/model/chunk: a counted refusal, never an exception, and
    nothing written outside the device's state directory."""
    rollout, events = _rollout(tmp_path)
    before = _outside(tmp_path)
    rollout._on_command(payload)
    # A command is answered by exactly one event, a refusal with its reason (or the status
    # asked for), and counted under that event's name.
    assert len(events) == 1, events
    ev = events[0]
    assert ev.state in ("refused", "status"), ev
    assert rollout.counters[ev.state] == 1
    if ev.state == "refused":
        assert ev.reason
    rollout._on_chunk(payload)
    # A chunk with no release being received is counted, not answered.
    assert rollout.counters["chunks_unexpected"] == 1
    assert len(events) == 1
    assert rollout.live.ref == "fake-pack@0.0.1"
    assert _outside(tmp_path) == before
    rollout.live.close()
