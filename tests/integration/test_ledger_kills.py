"""The cost ledger survives worker crashes: two `edge-agent cloud` processes in one shared
group, one SIGKILLed at random moments under load (12 kills), devices re-sending what was not
answered as the device's link does, and some verdicts lost on the way to the device (it was
offline then), so that cases already answered and charged come back, to either worker;
afterwards the ledger alone must show every answered case charged exactly once, at the prices
a replay of the answered cases gives."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest

from edge_agent.cloud.ledger import CostLedger
from edge_agent.cloud.ledger_store import summary_of
from edge_agent.wire.messages import BatchVerdicts, Verdict
from tests.broker import Mosquitto
from tests.cloud_peer import StatusWatcher, WorkerProcess, worker_env
from tests.integration.test_cloud import Devices, PackUnderTest, hard_case, pack  # noqa: F401
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

DEVICES = 20
KILLS = 12
#: New cases per second the devices send (about half urgent, half in batches of 1-8).
RATE = 120
#: A case without a verdict after this long is sent again (the device's link.confirm_timeout_s).
RESEND_S = 1.5
SEED = 20261128
#: Share of verdicts the devices never hear of (as when a device is offline as it is published).
LOST_VERDICTS = 0.05


class Fleet:
    """Devices that send hard cases and batches and re-send each one until it is answered."""

    def __init__(self, devices: Devices, cloud_pack: PackUnderTest, rng: random.Random) -> None:
        self.devices = devices
        self.pack = cloud_pack
        self.rng = rng
        self.lock = threading.Lock()
        self.pending: dict[str, tuple[str, Any, float]] = {}  # key -> (tier, case, sent at)
        self.tier_of: dict[str, str] = {}
        self.answered: dict[str, str] = {}  # key -> tier of its verdict
        self.verdicts: Counter[str] = Counter()
        self.readings: Counter[str] = Counter()  # the readings_total each device reached
        self.resent = 0
        self.lost = 0
        self.lose = random.Random(rng.random())  # used on the network thread only
        self.seq = 0
        devices.client.on_message = self._on_message

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if b'"verdicts"' in msg.payload:
            verdicts = msgspec.json.decode(msg.payload, type=BatchVerdicts).verdicts
        else:
            verdicts = [msgspec.json.decode(msg.payload, type=Verdict)]
        with self.lock:
            for v in verdicts:
                if self.lose.random() < LOST_VERDICTS:
                    self.lost += 1
                    continue
                self.verdicts[v.key] += 1
                self.answered[v.key] = v.tier
                self.pending.pop(v.key, None)

    def send_new(self) -> None:
        device = f"dev-{self.rng.randrange(DEVICES)}"
        urgent = self.rng.random() < 0.5
        cases = []
        for _ in range(1 if urgent else self.rng.randint(1, 8)):
            self.seq += 1
            self.readings[device] += self.rng.randint(1, 20)
            window = self.pack.windows[self.seq % len(self.pack.windows)]
            tier = "urgent" if urgent else "batch"
            case = hard_case(
                device, self.seq, window, tier=tier, readings_total=self.readings[device]
            )
            cases.append(case)
            with self.lock:
                self.pending[case.key] = (tier, case, time.monotonic())
                self.tier_of[case.key] = tier
        self._send(device, urgent, cases)

    def _send(self, device: str, urgent: bool, cases: list[Any]) -> None:
        if urgent:
            for case in cases:
                self.devices.send_urgent(case)
        else:
            self.devices.send_batch(device, cases)

    def resend_due(self) -> None:
        now = time.monotonic()
        with self.lock:
            due = [(k, t, c) for k, (t, c, at) in self.pending.items() if now - at >= RESEND_S]
            for k, t, c in due:
                self.pending[k] = (t, c, now)
        self.resent += len(due)
        batches: dict[str, list[Any]] = {}
        for _k, tier, case in due:
            if tier == "urgent":
                self.devices.send_urgent(case)
            else:
                batches.setdefault(case.device, []).append(case)
        for device, cases in batches.items():
            for start in range(0, len(cases), 64):
                self.devices.send_batch(device, cases[start : start + 64])

    def unanswered(self) -> int:
        with self.lock:
            return len(self.pending)


@pytest.fixture(params=["sqlite", "redis"])
def ledger_path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The ledger both workers share: one SQLite file (workers on one host), or Redis (a
    fleet's workers on any host)."""
    if request.param == "sqlite":
        yield str(tmp_path / "ledger.db")
        return
    server = RedisServer(tmp_path / "redis")
    yield server.url
    server.stop()


def test_every_answered_case_is_charged_once_through_repeated_sigkills(
    broker: Mosquitto,
    topic_prefix: str,
    pack: PackUnderTest,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    ledger_path: str,
) -> None:
    rng = random.Random(SEED)
    workers = {
        name: WorkerProcess(
            worker_env(broker.port, topic_prefix, pack.path, ledger_path, name),
            tmp_path / f"{name}.log",
        )
        for name in ("w1", "w2")
    }
    status = StatusWatcher(broker.port, topic_prefix)
    devices = Devices(broker.port, topic_prefix)
    fleet = Fleet(devices, pack, rng)
    stop_sending = threading.Event()

    def send() -> None:
        while not stop_sending.is_set():
            fleet.send_new()
            fleet.resend_due()
            time.sleep(1.0 / RATE)

    sender = threading.Thread(target=send, name="fleet")
    kills = 0
    try:
        for name, w in workers.items():
            w.start()
            assert status.wait_for(name, "online"), (tmp_path / f"{name}.log").read_text()
        sender.start()
        for k in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.5))
            name = ("w1", "w2")[k % 2]
            workers[name].kill()
            kills += 1
            assert status.wait_for(name, "offline", timeout=15)
            time.sleep(rng.uniform(0.0, 0.3))
            workers[name].start()
            assert status.wait_for(name, "online"), (tmp_path / f"{name}.log").read_text()
        stop_sending.set()
        sender.join()
        deadline = time.monotonic() + 60
        while fleet.unanswered() and time.monotonic() < deadline:
            fleet.resend_due()
            time.sleep(0.1)
        for name, w in workers.items():
            assert w.terminate() == 0, (tmp_path / f"{name}.log").read_text()
    finally:
        stop_sending.set()
        if sender.is_alive():
            sender.join()
        for w in workers.values():
            if w.alive():
                w.kill()
        status.close()
        devices.close()

    sent = len(fleet.tier_of)
    print(
        f"\n{sent} cases from {DEVICES} devices, {kills} SIGKILLs, {fleet.lost} verdicts lost,"
        f" {fleet.resent} cases re-sent, {sum(fleet.verdicts.values()) - len(fleet.verdicts)}"
        " verdicts repeated"
    )
    assert kills >= 10
    assert fleet.unanswered() == 0, "cases never answered"
    assert set(fleet.answered) == set(fleet.tier_of)
    assert fleet.lost > 0
    assert fleet.resent > fleet.lost  # answered cases came back (and unanswered ones)

    # From the ledger alone: what was charged ...
    saved = summary_of(ledger_path)
    total = saved["total"]
    # ... against a replay of the cases the devices got answers for, at the same prices.
    replay = CostLedger.from_pricing(saved["pricing"])
    for key, tier in fleet.answered.items():
        replay.charge(key.split(":")[0], tier)
    for device, readings in fleet.readings.items():
        replay.observe(device, readings)
    expected = replay.summary()["total"]
    by_tier = Counter(fleet.answered.values())
    assert (total["urgent"], total["batch"]) == (by_tier["urgent"], by_tier["batch"])
    assert total["urgent"] + total["batch"] == len(fleet.answered)
    for figure in ("tokens", "readings_total", "devices"):
        assert total[figure] == expected[figure], figure
    for figure in ("spend_urgent", "spend_batch", "spend", "all_cloud_sync", "all_cloud_batch"):
        assert total[figure] == pytest.approx(expected[figure], rel=1e-9), figure
