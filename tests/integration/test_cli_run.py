"""`edge-agent run` as a sensor producer sees it: what it prints, when it exits, what it writes.

The contract is in README.md ("What `run` prints"); these tests hold it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Mosquitto
from tests.conftest import make_fake_pack, settings_env
from tests.mqtt_peer import Collector

pytestmark = pytest.mark.integration

RUN = [sys.executable, "-m", "edge_agent", "run"]
DECISION_KEYS = {"id", "label", "confidence", "route", "reason", "model", "latency_ms"}


def lines_in(tmp: Path, tag: str) -> Path:
    """One local, one urgent, one batch reading (fake backend: the second value is the
    confidence; 0.8 the pack's threshold, below 0.5 urgent), one malformed line, one of the
    wrong shape."""
    rows = [
        json.dumps({"id": f"{tag}-local", "values": [[0, 0.95, 0, 0], [0, 0, 0, 0]]}),
        json.dumps({"id": f"{tag}-urgent", "values": [[1, 0.3, 0, 0], [0, 0, 0, 0]]}),
        json.dumps({"id": f"{tag}-batch", "values": [[2, 0.6, 0, 0], [0, 0, 0, 0]]}),
        "{not json",
        json.dumps({"id": f"{tag}-shape", "values": [[1, 2], [3, 4]]}),
    ]
    path = tmp / f"{tag}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def run_env(broker: Mosquitto, prefix: str, tmp: Path, source: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(
        settings_env(
            broker.port,
            prefix,
            tmp / "state",
            model_pack=str(make_fake_pack(tmp / "pack")),
            source_kind="jsonl",
            source_path=str(source),
            router_cooldown_s="0",
            link_batch_max_wait_s="0.2",
        )
    )
    return env


def test_run_prints_decisions_and_accepted_lines_and_writes_the_summary(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """``--decisions``: one decision or error line per input line, in input order; for each hard
    case, once it is committed to the outbox, ``{"accepted": key, "tier": tier}`` after its
    decision; nothing else. ``--summary-json`` writes the last telemetry snapshot. With
    ``--exit-when-drained`` it exits 0 once the cloud answered every hard case."""
    collector = Collector(broker.port, topic_prefix, answer=True)  # plays the cloud tier
    summary = tmp_path / "summary.json"
    env = run_env(broker, topic_prefix, tmp_path, lines_in(tmp_path, "a"))
    try:
        proc = subprocess.run(
            [*RUN, "--decisions", "--exit-when-drained", "--summary-json", str(summary)],
            env=env,
            capture_output=True,
            timeout=90,
            check=False,
        )
    finally:
        collector.close()
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out: list[dict[str, Any]] = [json.loads(x) for x in proc.stdout.splitlines()]
    decisions = [o for o in out if "label" in o or "error" in o]
    accepted = [o for o in out if "accepted" in o]
    assert len(decisions) + len(accepted) == len(out), "a line of another kind"
    # One line per input line, in input order.
    assert [d.get("id") for d in decisions] == ["a-local", "a-urgent", "a-batch", None, "a-shape"]
    local, urgent, batch, malformed, shape = decisions
    assert set(local) == DECISION_KEYS
    assert local["route"] == "local"
    for d, tier in ((urgent, "urgent"), (batch, "batch")):
        assert set(d) == DECISION_KEYS | {"tier", "key"}
        assert (d["route"], d["tier"]) == ("hard", tier)
    assert malformed["error"]["code"] == "malformed_json"
    assert shape["error"]["code"] == "wrong_shape"
    assert set(malformed["error"]) == {"code", "message"}
    # Each hard case accepted once, after its decision line, with its tier.
    assert sorted((a["accepted"], a["tier"]) for a in accepted) == sorted(
        [(urgent["key"], "urgent"), (batch["key"], "batch")]
    )
    for a in accepted:
        decided_at = next(i for i, o in enumerate(out) if o.get("key") == a["accepted"])
        assert out.index(a) > decided_at
        assert set(a) == {"accepted", "tier"}
    assert set(collector.keys) == {urgent["key"], batch["key"]}
    # The summary: the last telemetry snapshot.
    s = json.loads(summary.read_text())
    assert (s["readings"], s["rejected"], s["local"]) == (3, 2, 1)
    assert (s["hard_urgent"], s["hard_batch"]) == (1, 1)
    assert s["rejects"] == {"malformed_json": 1, "wrong_shape": 1}
    assert s["outbox"]["urgent"] == s["outbox"]["batch"] == 0
    assert s["model"] == "fake-pack@0.0.1"
    # And the status line on stderr, last.
    assert proc.stderr.decode().splitlines()[-1].startswith("edge-agent run: 3 readings, 2 hard")


def test_without_flags_run_prints_nothing_and_keeps_running_past_the_end_of_its_input(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """Without ``--decisions`` stdout stays empty; without ``--exit-when-drained`` the service
    does not exit when its input ends (it keeps delivering) until SIGTERM, which exits 0."""
    collector = Collector(broker.port, topic_prefix, answer=True)
    env = run_env(broker, topic_prefix, tmp_path, lines_in(tmp_path, "b"))
    try:
        with subprocess.Popen(
            RUN,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            try:
                deadline = time.monotonic() + 30
                while len(collector.keys) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert len(collector.keys) == 2, "the two hard cases never arrived"
                # The input has ended and everything is delivered; the service is still up.
                time.sleep(0.5)
                assert proc.poll() is None
                proc.send_signal(signal.SIGTERM)
                stdout, stderr = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        collector.close()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert stdout == b""
    assert b"source ended; still delivering until stopped" in stderr
