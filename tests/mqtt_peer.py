"""A real MQTT client playing the far side in tests: collects hard cases, may answer them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.wire.messages import SCHEMA_VERSION, Batch, BatchVerdicts, HardCase, Verdict


class Collector:
    """Subscribes to ``<prefix>/+/hard`` and ``/batch``; counts every case key it receives.

    With ``answer=True`` it replies to urgent cases on their response topic with the
    correlation data, and to batches with one ``BatchVerdicts``, echoing the local label (a
    stand-in for the cloud model, for link tests only; the real worker is tested in
    test_cloud.py).
    """

    def __init__(
        self, port: int, prefix: str, answer: bool = False, extra_topics: tuple[str, ...] = ()
    ) -> None:
        self.prefix = prefix
        self.answer = answer
        self.keys: Counter[str] = Counter()
        self.messages: list[tuple[str, bytes, Any]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.topics = [f"{prefix}/+/hard", f"{prefix}/+/batch", *extra_topics]
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("collector could not subscribe")

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), msg.properties))
        if msg.topic.endswith("/hard"):
            case = msgspec.json.decode(msg.payload, type=HardCase)
            cases = [case]
        elif msg.topic.endswith("/batch"):
            cases = msgspec.json.decode(msg.payload, type=Batch).cases
        else:
            return
        with self.lock:
            for c in cases:
                self.keys[c.key] += 1
        if self.answer and msg.topic.endswith("/hard"):
            asked = msg.properties
            assert asked is not None, "a hard case without MQTT v5 properties"
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = getattr(asked, "CorrelationData", None)
            verdict = Verdict(
                v=SCHEMA_VERSION,
                key=case.key,
                device=case.device,
                seq=case.seq,
                label=case.local.label,
                confidence=0.99,
                model="echo@0",
                tier="urgent",
            )
            client.publish(
                asked.ResponseTopic,  # type: ignore[attr-defined]  # set on the wire
                msgspec.json.encode(verdict),
                qos=1,
                properties=props,
            )
        elif self.answer:
            device = cases[0].device if cases else ""
            verdicts = [
                Verdict(
                    v=SCHEMA_VERSION,
                    key=c.key,
                    device=c.device,
                    seq=c.seq,
                    label=c.local.label,
                    confidence=0.99,
                    model="echo@0",
                    tier="batch",
                )
                for c in cases
            ]
            body = BatchVerdicts(v=SCHEMA_VERSION, device=device, verdicts=verdicts)
            client.publish(f"{self.prefix}/{device}/verdict", msgspec.json.encode(body), qos=1)

    def wait_for(self, keys: set[str], timeout: float) -> set[str]:
        """Wait until every key was received; returns the missing ones."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                missing = keys - set(self.keys)
            if not missing:
                return set()
            time.sleep(0.05)
        return missing

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
