"""Every source kind feeding a real agent (fake pack, real broker, real sockets)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import Settings, load_settings
from edge_agent.devtools.localbroker import Mosquitto, free_port
from edge_agent.ingest.sources import open_source
from edge_agent.ingest.sources.mqtt import MqttTopicSource
from edge_agent.models.pack import open_pack
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from tests.conftest import make_fake_pack, settings_env

pytestmark = pytest.mark.integration


def good(i: int) -> bytes:
    return json.dumps({"id": i, "values": [[i % 3, 0.95, 0, 0], [0, 0, 0, 0]]}).encode()


BAD = [b"{nope", b'{"id": "s", "values": [[1, 2], [3, 4]]}', b"x" * 3000]


class Harness:
    """An agent on a fake pack, run in a thread, its output lines collected."""

    def __init__(self, broker: Mosquitto, prefix: str, tmp: Path, **extra: str) -> None:
        pack = make_fake_pack(tmp / "pack")
        env = settings_env(
            broker.port,
            prefix,
            tmp / "state",
            model_pack=str(pack),
            input_max_line_bytes="2048",
            **extra,
        )
        self.settings: Settings = load_settings(None, env=env)
        self.scorer = Scorer.open(open_pack(pack))
        self.lines: list[dict] = []
        self.agent = Agent(self.settings, self.scorer, emit=self._emit)
        spec = self.scorer.pack.manifest.input
        self.source = open_source(self.settings, tuple(spec.shape), spec.hop)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run)

    def _emit(self, data: bytes) -> None:
        self.lines.extend(json.loads(x) for x in data.splitlines())

    def _run(self) -> None:
        self.code = self.agent.run(self.source, exit_when_drained=True, drain_timeout_s=10)

    def decisions(self) -> list[dict]:
        return [x for x in self.lines if "label" in x or "error" in x]

    def wait_for(self, n: int, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.decisions()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.decisions()

    def stop(self) -> int | None:
        self.agent.request_stop("test")
        self.thread.join(15)
        return self.code


def check(decisions: list[dict], n_good: int) -> None:
    assert len(decisions) == n_good + len(BAD)
    errors = sorted(d["error"]["code"] for d in decisions if "error" in d)
    assert errors == ["malformed_json", "too_large", "wrong_shape"]
    assert sorted(d["id"] for d in decisions if "label" in d) == list(range(n_good))


def test_jsonl_file(broker: Mosquitto, topic_prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([*(good(i) for i in range(30)), *BAD]) + b"\n")
    h = Harness(broker, topic_prefix, tmp_path, source_kind="jsonl", source_path=str(path))
    h.thread.start()
    h.thread.join(30)
    assert h.code == 0
    check(h.decisions(), 30)
    assert h.agent.pipeline.rejects == {"malformed_json": 1, "too_large": 1, "wrong_shape": 1}


def test_replay_with_rate_loops_and_noise(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(good(i) for i in range(10)) + b"\n")
    h = Harness(
        broker,
        topic_prefix,
        tmp_path,
        source_kind="replay",
        source_path=str(path),
        source_rate_hz="100",
        source_loops="3",
        source_noise="0.1",
    )
    start = time.monotonic()
    h.thread.start()
    h.thread.join(30)
    assert h.code == 0
    assert time.monotonic() - start >= 30 / 100 * 0.9  # paced, not as fast as possible
    ids = [d["id"] for d in h.decisions()]
    assert len(ids) == 30
    assert ids[:10] == list(range(10))
    assert ids[10] == "0#1"


@pytest.mark.parametrize("kind", ["udp", "unix"])
def test_datagram_sockets(broker: Mosquitto, topic_prefix: str, tmp_path: Path, kind: str) -> None:
    address = f"127.0.0.1:{free_port()}" if kind == "udp" else str(tmp_path / "in.sock")
    h = Harness(broker, topic_prefix, tmp_path, source_kind=kind, source_path=address)
    h.thread.start()
    family = socket.AF_INET if kind == "udp" else socket.AF_UNIX
    target: tuple[str, int] | str = (
        ("127.0.0.1", int(address.rsplit(":", 1)[1])) if kind == "udp" else address
    )
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for datagram in [*(good(i) for i in range(20)), *BAD]:
            s.sendto(datagram, target)
    check(h.wait_for(23), 20)
    assert h.stop() == 0


def test_mqtt_topic(broker: Mosquitto, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}/sensors/imu"
    h = Harness(
        broker,
        topic_prefix,
        tmp_path,
        source_kind="mqtt",
        source_path=topic,
        source_port=str(broker.port),
    )
    h.thread.start()
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    assert isinstance(h.source, MqttTopicSource)
    assert h.source.subscribed.wait(10), "the source never subscribed"
    for payload in [*(good(i) for i in range(20)), *BAD]:
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    check(h.wait_for(23), 20)
    pub.loop_stop()
    pub.disconnect()
    assert h.stop() == 0


def test_mqtt_topic_on_a_broker_that_wants_a_password(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """The source's broker is not the uplink's and refuses anonymous clients: the [source]
    section's user name and password file (read like [mqtt]'s) get the readings through."""
    folder = tmp_path / "source-broker"
    folder.mkdir()
    passwd = folder / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "sensor-reader", "s3cret-source"],
        check=True,
    )
    passwd.chmod(0o644)
    secured = Mosquitto(folder, anonymous=False, extra=f"user root\npassword_file {passwd}")
    secured.start()
    secret = tmp_path / "source-password"
    secret.write_text("s3cret-source\n")
    topic = f"{topic_prefix}/sensors/imu"
    try:
        h = Harness(
            broker,
            topic_prefix,
            tmp_path,
            source_kind="mqtt",
            source_path=topic,
            source_port=str(secured.port),
            source_username="sensor-reader",
            source_password_file=str(secret),
        )
        h.thread.start()
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.username_pw_set("sensor-reader", "s3cret-source")
        pub.connect("127.0.0.1", secured.port)
        pub.loop_start()
        assert isinstance(h.source, MqttTopicSource)
        assert h.source.subscribed.wait(10), "the source never subscribed"
        for payload in [*(good(i) for i in range(20)), *BAD]:
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
        check(h.wait_for(23), 20)
        pub.loop_stop()
        pub.disconnect()
        assert h.stop() == 0
    finally:
        secured.stop()


def test_sample_stream_is_windowed(broker: Mosquitto, topic_prefix: str, tmp_path: Path) -> None:
    # The fake pack's windows are 2 channels x 4 samples; hop defaults to the window length.
    samples = [json.dumps({"id": i, "values": [i % 3, 0.9]}).encode() for i in range(10)]
    chunk = json.dumps({"id": "chunk", "values": [[0, 0.9], [0, 0.9]]}).encode()
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b"\n".join([*samples, chunk, b'{"values": [1, 2, 3]}']) + b"\n")
    h = Harness(
        broker,
        topic_prefix,
        tmp_path,
        source_kind="jsonl",
        source_path=str(path),
        source_samples="true",
    )
    h.thread.start()
    h.thread.join(30)
    decisions = h.decisions()
    windows = [d for d in decisions if "label" in d]
    assert [w["id"] for w in windows] == [3, 7, "chunk"]  # 12 good samples, windows of 4
    assert [d["error"]["code"] for d in decisions if "error" in d] == ["wrong_shape"]
    # The first window holds samples 0..3: channel 0 = [0, 1, 2, 0] -> fake label index 0.
    assert windows[0]["label"] == "a"
