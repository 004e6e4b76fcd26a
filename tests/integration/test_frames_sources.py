"""Binary frames through every source kind that takes them and through ``edge-agent score``
(fake pack for the sources, real broker, real FIFO and MQTT topic; the default pack for score)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import load_settings
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.errors import ConfigError
from edge_agent.ingest.sources import open_source
from edge_agent.ingest.sources.mqtt import MqttTopicSource
from edge_agent.models.pack import BUNDLED_TEST_DATA
from edge_agent.wire.frames import encode_frame
from tests.conftest import settings_env
from tests.integration.test_sources import Harness

pytestmark = pytest.mark.integration


def good(i: int) -> bytes:
    return encode_frame([[i % 3, 0.95, 0, 0], [0, 0, 0, 0]], id=str(i))


#: Frames a datagram or message source must reject, one code each.
BAD = {
    "bad_frame": b"not a frame at all",
    "non_finite": encode_frame([[np.nan, 0.95, 0, 0], [0, 0, 0, 0]], id="nan"),
    "too_large": encode_frame(np.zeros((2, 4)), id="x" * 200) + bytes(4000),
    "wrong_shape": encode_frame(np.zeros((4, 2))),
}


def check(decisions: list[dict], n_good: int, codes: list[str]) -> None:
    assert len(decisions) == n_good + len(codes)
    errors = sorted(d["error"]["code"] for d in decisions if "error" in d)
    assert errors == sorted(codes)
    assert sorted(int(d["id"]) for d in decisions if "label" in d) == list(range(n_good))


FRAMES = {"source_format": "frames", "input_max_frame_bytes": "4096"}


def test_frames_back_to_back_from_a_fifo(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """``kind = "jsonl"`` on a FIFO: frames written in pieces, a bad header resynchronised at
    the next magic, a truncated tail rejected when the writer closes."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    stream = b"".join(
        [*(good(i) for i in range(15)), b"garbage", *(good(i) for i in range(15, 30))]
    )
    stream += BAD["non_finite"] + good(99)[:-5]

    def writer() -> None:
        with open(fifo, "wb", buffering=0) as f:
            for at in range(0, len(stream), 1000):
                f.write(stream[at : at + 1000])

    t = threading.Thread(target=writer)
    t.start()  # opening a FIFO waits for the other end: the writer first
    h = Harness(
        broker, topic_prefix, tmp_path, source_kind="jsonl", source_path=str(fifo), **FRAMES
    )
    h.thread.start()
    h.thread.join(30)
    t.join(5)
    if h.thread.is_alive():  # the agent's thread must end even when the test fails
        h.stop()
    assert h.code == 0
    check(h.decisions(), 30, ["bad_frame", "non_finite", "bad_frame"])
    assert h.agent.pipeline.rejects == {"bad_frame": 2, "non_finite": 1}


def test_frames_on_an_mqtt_topic(broker: Mosquitto, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}/sensors/imu"
    h = Harness(
        broker,
        topic_prefix,
        tmp_path,
        source_kind="mqtt",
        source_path=topic,
        source_port=str(broker.port),
        **FRAMES,
    )
    h.thread.start()
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        assert isinstance(h.source, MqttTopicSource)
        assert h.source.subscribed.wait(10), "the source never subscribed"
        for payload in [*(good(i) for i in range(20)), *BAD.values()]:
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
        decisions = h.wait_for(24)
    finally:  # the agent's thread must end even when the test fails
        pub.loop_stop()
        pub.disconnect()
        code = h.stop()
    check(decisions, 20, list(BAD))
    assert h.agent.pipeline.rejects == dict.fromkeys(BAD, 1)
    assert code == 0


def test_frames_are_refused_with_replay_and_sample_streams(tmp_path: Path) -> None:
    for extra in ({"source_kind": "replay"}, {"source_samples": "true"}):
        env = settings_env(1883, "t", tmp_path, source_format="frames", **extra)
        with pytest.raises(ConfigError, match="frames"):
            open_source(load_settings(None, env=env), (2, 4), None)
    env = settings_env(1883, "t", tmp_path, source_format="frames", input_max_frame_bytes="40")
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        open_source(load_settings(None, env=env), (2, 4), None)


def test_score_format_frames_decides_as_score_of_json_lines(tmp_path: Path) -> None:
    """``edge-agent score --format frames`` on stdin and on a file: the decisions of the JSON
    lines, in order, and the rejections of a damaged stream counted in the summary."""
    windows = [json.loads(x) for x in BUNDLED_TEST_DATA.read_bytes().splitlines() if x.strip()]
    frames = b"".join(encode_frame(w["values"], id=w["id"]) for w in windows)
    cmd = [sys.executable, "-m", "edge_agent", "score"]
    expected = subprocess.run(
        [*cmd, str(BUNDLED_TEST_DATA)], capture_output=True, check=True
    ).stdout.splitlines()
    from_stdin = subprocess.run(
        [*cmd, "--format", "frames"], input=frames, capture_output=True, check=True
    )
    path = tmp_path / "in.frames"
    path.write_bytes(frames + b"EAFR\x02" + bytes(20) + frames[:100])
    from_file = subprocess.run(
        [*cmd, "--format", "frames", str(path)], capture_output=True, check=True
    )

    def decided(out: bytes) -> list[tuple[object, ...]]:
        rows = [json.loads(x) for x in out.splitlines()]
        return [(r.get("id"), r.get("label"), r.get("confidence"), r.get("route")) for r in rows]

    assert decided(from_stdin.stdout) == decided(b"\n".join(expected))
    lines = from_file.stdout.splitlines()
    assert decided(b"\n".join(lines[: len(windows)])) == decided(b"\n".join(expected))
    # The unknown version is rejected and the reader resynchronises at the next magic: the
    # start of a frame the file ends inside.
    codes = [json.loads(x)["error"]["code"] for x in lines[len(windows) :]]
    assert codes == ["unsupported_frame", "bad_frame"]
    assert b"2 rejected (bad_frame: 1, unsupported_frame: 1)" in from_file.stderr
