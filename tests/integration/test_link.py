"""The link and the outbox against a real mosquitto: delivery, outages, refusals, TTLs."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import Settings, load_settings
from edge_agent.delivery.link import Link
from edge_agent.delivery.outbox import Cls
from edge_agent.service.wiring import open_outbox
from edge_agent.wire.messages import Status, Topics
from tests.broker import Mosquitto
from tests.conftest import make_fake_pack, puback_env, settings_env
from tests.integration.test_faults import wait_until
from tests.mqtt_peer import Collector

pytestmark = pytest.mark.integration


def make_link(settings: Settings) -> tuple[Link, list[str]]:
    stored: list[str] = []
    link = Link(
        settings,
        open_outbox(settings),
        settings.device_id,
        model="m@1",
        on_stored=lambda _tier, key: stored.append(key),
    )
    return link, stored


def case(key: str, tier: str = "urgent") -> bytes:
    device, _, seq = key.partition(":")
    return (
        b'{"v":1,"key":"%s","device":"%s","seq":%s,"values":[[0,0.4,0,0],[0,0,0,0]],'
        b'"local":{"label":"a","confidence":0.4,"reason":"low_confidence","model":"m@1"},'
        b'"tier":"%s"}' % (key.encode(), device.encode(), seq.encode(), tier.encode())
    )


def submit(link: Link, topics: Topics, n: int, start: int = 0, batch_every: int = 0) -> list[str]:
    keys = []
    for i in range(start, start + n):
        key = f"dev1:{i}"
        is_batch = batch_every and i % batch_every == 0
        cls = Cls.BATCH if is_batch else Cls.URGENT
        topic = topics.batch("dev1") if is_batch else topics.hard("dev1")
        assert link.submit(cls, key, topic, case(key, "batch" if is_batch else "urgent"))
        keys.append(key)
    return keys


def read_status(port: int, topic: str) -> Status:
    got: list[bytes] = []
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        c.loop(0.05)
    c.disconnect()
    assert got, "no retained status"
    return msgspec.json.decode(got[-1], type=Status)


def test_delivery_status_and_empty_outbox(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    env = puback_env(
        broker.port, topic_prefix, tmp_path, link_batch_max_cases="50", link_batch_max_wait_s="0.2"
    )
    settings = load_settings(None, env=env)
    collector = Collector(broker.port, topic_prefix)
    link, stored = make_link(settings)
    link.start()
    try:
        assert link.connected.wait(5)
        keys = submit(link, Topics(topic_prefix), 300, batch_every=3)
        assert collector.wait_for(set(keys), 15) == set()
        deadline = time.monotonic() + 5
        while not link.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.outbox.depth() == {"urgent": 0, "batch": 0, "telemetry": 0}
        assert sorted(stored) == sorted(keys)
        assert link.counters["published_urgent"] == 200
        assert link.counters["published_batch"] == 100
        batches = [m for m in collector.messages if m[0].endswith("/batch")]
        assert 2 <= len(batches) <= 10  # grouped, not one message per case
        hard = next(m for m in collector.messages if m[0].endswith("/hard"))
        props = hard[2]
        assert dict(props.UserProperty)["idempotency-key"].startswith("dev1:")
        assert props.ResponseTopic == f"{topic_prefix}/dev1/verdict"
        assert props.CorrelationData.decode().startswith("dev1:")
        assert 0 < props.MessageExpiryInterval <= 3600
        assert read_status(broker.port, f"{topic_prefix}/dev1/status").state == "online"
    finally:
        link.stop()
        collector.close()
    assert read_status(broker.port, f"{topic_prefix}/dev1/status").state == "offline"


def test_broker_killed_mid_flow_loses_nothing(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """mosquitto SIGKILLed for 3 s while thousands of hard cases flow to a real cloud worker,
    then restarted on the same port: every accepted case is scored by the worker exactly once
    (duplicates dropped by idempotency key) and the device's outbox ends empty. The broker keeps
    nothing on disk; what it acknowledged and then lost with its memory comes back because the
    device keeps a hard case until the worker's verdict settles it."""
    broker_kill_flow(broker, topic_prefix, tmp_path, downtimes=[3.0])


#: Broker kills in the long mode (``pytest -m slow``); ``TEST_BROKER_KILLS`` changes it.
BROKER_KILLS = int(os.environ.get("TEST_BROKER_KILLS", "20"))


@pytest.mark.slow
def test_broker_killed_again_and_again_mid_flow_loses_nothing(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """The long mode of the test above: the broker is SIGKILLed ``BROKER_KILLS`` times in one
    flow, each time after a random 2-4 s up and down for a random 0.1-3 s (seeded), so kills
    land at every point of the device's and the worker's cycle: reconnecting, replaying its
    in-flight window, waiting for verdicts, mid-batch."""
    rng = random.Random(20261128)
    downtimes = [rng.uniform(0.1, 3.0) for _ in range(BROKER_KILLS)]
    uptimes = [rng.uniform(2.0, 4.0) for _ in range(BROKER_KILLS)]
    # 400 cases/s and 2-4 s up: a backlog the device clears between kills, so the urgent class
    # never reaches its bound (refusing cases there is the documented policy, not what is
    # tested). With ~1 s up between kills the backlog of a 2-core machine did reach it.
    broker_kill_flow(
        broker, topic_prefix, tmp_path, downtimes=downtimes, uptimes=uptimes, pace_s=0.05
    )


def broker_kill_flow(
    broker: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
    *,
    downtimes: list[float],
    uptimes: list[float] | None = None,
    pace_s: float = 0.01,
) -> None:
    """Hard cases flow (20 every ``pace_s``) while the broker is SIGKILLed for each of
    ``downtimes`` after each of ``uptimes``; then every stored case was scored once."""
    env = settings_env(
        broker.port,
        topic_prefix,
        tmp_path / "state",
        link_batch_max_cases="20",
        link_batch_max_wait_s="0.2",
        cloud_pack=str(make_fake_pack(tmp_path / "pack")),
        cloud_group="pool",
        cloud_worker_id="w1",
        cloud_dedupe_keys="1000000",  # a long flow's keys all stay in the worker's memory
    )
    settings = load_settings(None, env=env)
    worker = CloudWorker(settings)
    worker.start()
    assert worker.ready.wait(10), worker.last_error
    link, stored = make_link(settings)
    link.start()
    topics = Topics(topic_prefix)
    submitted: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            submitted.extend(submit(link, topics, 20, start=i, batch_every=4))
            i += 20
            time.sleep(pace_s)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for down, up in zip(downtimes, uptimes or [1.0] * len(downtimes), strict=True):
            time.sleep(up)
            broker.kill()
            time.sleep(down)
            broker.start()  # same port, empty: no sessions, no queued messages
        time.sleep(1.5)
        stop.set()
        producer.join()
        link.flush_batches()
        assert len(submitted) > 2000
        assert link.counters["store_failed_urgent"] == 0, f"outbox bound reached: {link.counters}"
        deadline = time.monotonic() + 60
        while not link.idle() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert link.outbox.depth() == {"urgent": 0, "batch": 0, "telemetry": 0}
        assert set(stored) == set(submitted)
        unanswered = [k for k in stored if worker.memory.get("dev1", k) is None]
        assert unanswered == [], f"{len(unanswered)} accepted hard cases never reached the worker"
        scored = worker.counters["urgent_scored"] + worker.counters["batch_cases_scored"]
        assert scored == len(set(stored))  # each exactly once after dedupe
        assert link.counters["disconnects"] >= len(downtimes)
        print(
            f"\n{len(downtimes)} broker kill(s), {len(stored)} cases; resent after no verdict: "
            f"{link.counters['unconfirmed_resent']}; worker duplicates dropped: "
            f"{worker.counters['duplicates']}"
        )
    finally:
        stop.set()
        link.stop()
        worker.stop()


def test_hard_case_is_kept_and_resent_until_its_verdict_comes(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """link.confirm = "verdict": the broker's PUBACK alone does not settle a hard case; with no
    verdict it is sent again after link.confirm_timeout_s, and the verdict deletes it."""
    env = settings_env(broker.port, topic_prefix, tmp_path, link_confirm_timeout_s="0.5")
    collector = Collector(broker.port, topic_prefix)  # receives, never answers
    link, _ = make_link(load_settings(None, env=env))
    link.start()
    try:
        assert link.connected.wait(5)
        keys = submit(link, Topics(topic_prefix), 3)
        assert collector.wait_for(set(keys), 5) == set()
        deadline = time.monotonic() + 5
        while min(collector.keys[k] for k in keys) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert min(collector.keys[k] for k in keys) >= 2  # sent again, same key
        assert link.outbox.depth()["urgent"] == 3
        assert link.counters["unconfirmed_resent"] >= 3
        answer = Collector(broker.port, topic_prefix, answer=True)  # now someone answers
        try:
            deadline = time.monotonic() + 5
            while not link.idle() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert link.outbox.depth()["urgent"] == 0
            assert link.counters["confirmed"] == 3
        finally:
            answer.close()
    finally:
        link.stop()
        collector.close()


def test_refused_connack_is_a_failure(tmp_path: Path, topic_prefix: str) -> None:
    b = Mosquitto(tmp_path / "broker", anonymous=False).start()
    try:
        settings = load_settings(None, env=puback_env(b.port, topic_prefix, tmp_path / "state"))
        link, stored = make_link(settings)
        link.start()
        keys = submit(link, Topics(topic_prefix), 3)
        deadline = time.monotonic() + 5
        while link.counters["connect_refused"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.counters["connect_refused"] >= 2
        assert not link.connected.is_set()
        assert link.counters["connects"] == 0
        assert sorted(stored) == sorted(keys)
        assert link.outbox.depth()["urgent"] == 3
        assert "refused" in link.last_error
        link.stop()
    finally:
        b.stop()


def test_no_subscriber_means_held_not_lost(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    env = puback_env(broker.port, topic_prefix, tmp_path, link_retry_no_subscribers_s="0.2")
    link, _ = make_link(load_settings(None, env=env))
    link.start()
    try:
        assert link.connected.wait(5)
        keys = submit(link, Topics(topic_prefix), 5)
        deadline = time.monotonic() + 5
        while link.counters["no_subscribers_urgent"] < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.counters["no_subscribers_urgent"] >= 5
        assert link.outbox.depth()["urgent"] == 5
        collector = Collector(broker.port, topic_prefix)
        assert collector.wait_for(set(keys), 10) == set()
        collector.close()
    finally:
        link.stop()


def test_expired_messages_are_never_published(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    env = puback_env(broker.port, topic_prefix, tmp_path, outbox_urgent_ttl_s="0.2")
    settings = load_settings(None, env=env)
    outbox = open_outbox(settings)
    outbox.put(Cls.URGENT, "dev1:1", Topics(topic_prefix).hard("dev1"), case("dev1:1"))
    time.sleep(0.3)
    collector = Collector(broker.port, topic_prefix)
    link = Link(settings, outbox, "dev1")
    link.start()
    try:
        assert link.connected.wait(5)
        fresh = submit(link, Topics(topic_prefix), 1, start=2)
        assert collector.wait_for(set(fresh), 10) == set()
        assert "dev1:1" not in collector.keys
        assert outbox.counters["expired_urgent"] == 1
    finally:
        link.stop()
        collector.close()


def test_telemetry_goes_straight_out_while_connected_and_is_stored_while_offline(
    topic_prefix: str, tmp_path: Path
) -> None:
    """``telemetry.qos = 0``: a snapshot handed to a connected link is published without a
    row in the outbox, with its idempotency key; one handed over while the broker is down is
    stored, and published once the broker is back; after that, straight out again."""
    b = Mosquitto(tmp_path / "broker").start()
    port = b.port
    settings = load_settings(None, env=puback_env(port, topic_prefix, tmp_path / "state"))
    assert settings.telemetry.qos == 0
    topics = Topics(topic_prefix)
    telemetry = f"{topic_prefix}/+/telemetry"
    collector = Collector(port, topic_prefix, extra_topics=(telemetry,))
    link, stored = make_link(settings)
    link.start()

    def received() -> list[str]:
        return [
            dict(p.UserProperty)["idempotency-key"]
            for t, _, p in list(collector.messages)
            if t.endswith("/telemetry")
        ]

    try:
        assert link.connected.wait(5)
        for i in range(3):
            assert link.submit(Cls.TELEMETRY, f"dev1:t{i}", topics.telemetry("dev1"), b'{"v":1}')
        assert wait_until(lambda: received() == ["dev1:t0", "dev1:t1", "dev1:t2"], 5), received()
        assert stored == []  # never written to the outbox
        assert link.counters["published_telemetry"] == 3
        collector.close()
        b.stop()
        assert wait_until(lambda: not link.connected.is_set(), 10)
        assert link.submit(Cls.TELEMETRY, "dev1:t3", topics.telemetry("dev1"), b'{"v":1}')
        assert wait_until(lambda: link.outbox.depth()["telemetry"] == 1, 5)
        assert stored == ["dev1:t3"]
        b.start()  # the same port, empty
        collector = Collector(port, topic_prefix, extra_topics=(telemetry,))
        assert link.connected.wait(15)
        assert wait_until(lambda: received() == ["dev1:t3"], 10), received()
        assert wait_until(lambda: link.outbox.depth()["telemetry"] == 0, 5)
        assert link.submit(Cls.TELEMETRY, "dev1:t4", topics.telemetry("dev1"), b'{"v":1}')
        assert wait_until(lambda: received() == ["dev1:t3", "dev1:t4"], 5), received()
        assert stored == ["dev1:t3"]
    finally:
        link.stop()
        collector.close()
        b.stop()
