"""The link and the outbox against a real mosquitto: delivery, outages, refusals, TTLs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import open_outbox
from edge_agent.config import Settings, load_settings
from edge_agent.link import Link
from edge_agent.messages import Status, Topics
from edge_agent.outbox import Cls
from tests.broker import Mosquitto
from tests.conftest import settings_env
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
        b'{"v":1,"key":"%s","device":"%s","seq":%s,"values":[[1.0]],'
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
    env = settings_env(
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


@pytest.mark.slow  # flaky about 1 run in 5 (a handful of cases missing); see docs/reliability.md
def test_broker_killed_mid_flow_loses_nothing(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """Every accepted case arrives, except what the broker itself had acknowledged (PUBACK)
    and still held in memory when it was SIGKILLed: a broker without persistence cannot give
    those back, and the device, having its PUBACK, rightly deleted them. Those are allowed
    only if the broker acknowledged them within a moment of its death, and are counted."""
    settings = load_settings(None, env=settings_env(broker.port, topic_prefix, tmp_path))
    collector = Collector(broker.port, topic_prefix)
    link, stored = make_link(settings)
    acked_at: dict[str, float] = {}
    real_ack = link.outbox.ack

    def recording_ack(ids: list[int]) -> int:
        marks = ",".join("?" * len(ids))
        rows = link.outbox._db.execute(f"SELECT key FROM messages WHERE id IN ({marks})", ids)
        now = time.monotonic()
        for (key,) in rows.fetchall():
            acked_at.setdefault(key, now)
        return real_ack(ids)

    link.outbox.ack = recording_ack  # type: ignore[method-assign]
    link.start()
    topics = Topics(topic_prefix)
    submitted: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            submitted.extend(submit(link, topics, 20, start=i, batch_every=4))
            i += 20
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        broker.kill()
        time.sleep(3.0)
        broker.start()  # same port
        time.sleep(1.5)
        stop.set()
        producer.join()
        link.flush_batches()
        assert len(submitted) > 2000
        missing = collector.wait_for(set(stored), 30)
        lost_in_broker = {
            k for k in missing if killed_at - 1.0 <= acked_at.get(k, -1e9) <= killed_at
        }
        assert missing - lost_in_broker == set(), (
            f"{len(missing)} accepted hard cases never arrived"
        )
        if lost_in_broker:
            print(
                f"\n{len(lost_in_broker)} cases acknowledged by the broker just before its SIGKILL"
            )
        assert len(lost_in_broker) <= 64  # at most one in-flight window
        assert set(stored) == set(submitted)
        assert link.counters["disconnects"] >= 1
    finally:
        stop.set()
        link.stop()
        collector.close()


def test_refused_connack_is_a_failure(tmp_path: Path, topic_prefix: str) -> None:
    b = Mosquitto(tmp_path / "broker", anonymous=False).start()
    try:
        settings = load_settings(None, env=settings_env(b.port, topic_prefix, tmp_path / "state"))
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
    env = settings_env(broker.port, topic_prefix, tmp_path, link_retry_no_subscribers_s="0.2")
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
    env = settings_env(broker.port, topic_prefix, tmp_path, outbox_urgent_ttl_s="0.2")
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
