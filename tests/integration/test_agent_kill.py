"""SIGKILL the agent at random points while it publishes: no accepted hard case is lost."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import load_settings
from edge_agent.wire.messages import Batch, HardCase
from tests.broker import Mosquitto
from tests.conftest import make_fake_pack, settings_env
from tests.mqtt_peer import Collector

pytestmark = pytest.mark.integration

KILLS = int(os.environ.get("TEST_AGENT_KILLS", "20"))


def agent_env(broker: Mosquitto, prefix: str, state: Path, pack: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        settings_env(
            broker.port,
            prefix,
            state,
            model_pack=str(pack),
            cloud_pack=str(pack),
            cloud_group="pool",
            router_cooldown_s="0",
            router_max_urgent_per_minute="1000000",
            link_batch_max_cases="20",
            link_batch_max_wait_s="0.1",
        )
    )
    return env


def reading(i: int, round_: int) -> bytes:
    # fake backend: first value = label index, second = confidence; 0.8 is the pack's threshold
    conf = (0.3, 0.6, 0.95)[i % 3]  # urgent, batch, local
    values = [[i % 3, conf, 0, 0], [0, 0, 0, 0]]
    return json.dumps({"id": f"r{round_}-{i}", "values": values}).encode() + b"\n"


def run_once(
    env: dict[str, str], round_: int, kill_after: float | None, accepted: set[str], log: Path
) -> int:
    args = [sys.executable, "-m", "edge_agent", "run", "--decisions"]
    if kill_after is None:
        args += ["--exit-when-drained", "--drain-timeout", "60"]
    with (
        log.open("ab") as err,
        subprocess.Popen(
            args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0
        ) as proc,
    ):
        return _drive(proc, round_, kill_after, accepted)


def _drive(
    proc: subprocess.Popen[bytes], round_: int, kill_after: float | None, accepted: set[str]
) -> int:
    assert proc.stdin is not None
    assert proc.stdout is not None

    def feed() -> None:
        assert proc.stdin is not None
        try:
            if kill_after is not None:
                for i in range(100_000):
                    proc.stdin.write(reading(i, round_))
                    if i % 10 == 0:
                        proc.stdin.flush()
                        time.sleep(0.002)
            proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass

    started = threading.Event()  # the agent printed its first decision: it is up and scoring

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            started.set()
            if not line.endswith(b"\n"):
                continue  # cut short by the kill
            obj = json.loads(line)
            if "accepted" in obj:
                accepted.add(obj["accepted"])

    feeder = threading.Thread(target=feed, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    feeder.start()
    reader.start()
    if kill_after is not None:
        # The random point is counted from the first decision, not from the spawn: how long
        # the interpreter takes to start on a loaded machine must not decide where it dies.
        assert started.wait(60), "the agent printed no decision"
        time.sleep(kill_after)
        proc.kill()
    code = proc.wait(timeout=90)
    reader.join(10)
    feeder.join(10)
    return code


def test_sigkill_at_random_points_loses_no_accepted_hard_case(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    sigkill_rounds(broker, topic_prefix, tmp_path, KILLS)


#: SIGKILLs in the long mode (``pytest -m slow``); ``TEST_AGENT_KILLS_LONG`` changes it.
LONG_KILLS = int(os.environ.get("TEST_AGENT_KILLS_LONG", "60"))


@pytest.mark.slow
def test_sigkill_at_random_points_long(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """The long mode of the test above: ``LONG_KILLS`` (60) random SIGKILLs on one state dir."""
    assert LONG_KILLS >= 50
    sigkill_rounds(broker, topic_prefix, tmp_path, LONG_KILLS, seed=20261128)


def sigkill_rounds(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path, kills: int, seed: int = 20261127
) -> None:
    """``kills`` runs of the agent, each SIGKILLed a random 0.4-1.5 s after its first
    decision, then one run to the end of its input: every hard case reported accepted
    reached the cloud worker."""
    rng = random.Random(seed)
    pack = make_fake_pack(tmp_path / "pack")
    state = tmp_path / "state"
    env = agent_env(broker, topic_prefix, state, pack)
    # The worker answers; its verdicts settle cases. Its answer memory (the check below reads it)
    # holds every key of the run: the default 100,000 is less than the long mode accepts on a
    # quiet machine (60 rounds of up to ~2,000 cases), and the LRU would forget the first ones.
    worker_env = {**env, "EDGE_AGENT_CLOUD_DEDUPE_KEYS": "2000000"}
    worker = CloudWorker(load_settings(None, env=worker_env))
    worker.start()
    assert worker.ready.wait(10), worker.last_error
    collector = Collector(broker.port, topic_prefix)  # sees every send, duplicates included
    accepted: set[str] = set()
    try:
        for round_ in range(kills):
            code = run_once(env, round_, rng.uniform(0.4, 1.5), accepted, tmp_path / "agent.log")
            assert code == -9
        assert run_once(env, kills, None, accepted, tmp_path / "agent.log") == 0
        assert len(accepted) > 50 * kills
        assert len(accepted) < worker.memory.size, "the check below needs every key remembered"
        missing = collector.wait_for(accepted, 30)
        assert missing == set(), f"{len(missing)} of {len(accepted)} accepted hard cases lost"
        unanswered = [k for k in accepted if worker.memory.get("dev1", k) is None]
        assert unanswered == [], f"{len(unanswered)} accepted hard cases never reached the worker"
        scored = worker.counters["urgent_scored"] + worker.counters["batch_cases_scored"]
        assert scored == len(collector.keys)  # every key sent was scored once, duplicates dropped
        # A key always names the same reading: duplicates are re-sends, never new readings.
        seen: dict[str, str] = {}
        for topic, payload, _ in collector.messages:
            cases = (
                [msgspec.json.decode(payload, type=HardCase)]
                if topic.endswith("/hard")
                else msgspec.json.decode(payload, type=Batch).cases
            )
            for c in cases:
                assert seen.setdefault(c.key, str(c.id)) == str(c.id)
        db = sqlite3.connect(state / "outbox.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM messages WHERE cls < 2").fetchone()[0] == 0
        db.close()
    finally:
        collector.close()
        worker.stop()
