"""Readings published on a topic of an MQTT broker (one JSON line, or frame, per message).

The client is the session every MQTT user of ours makes (``mqtt.session.new_client``), with
the TLS and credentials of the ``[source]`` section, so an input topic on a secured broker
works as the uplink does.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.config import Settings
from edge_agent.errors import ConfigError
from edge_agent.ingest.frames import FrameDecoder
from edge_agent.ingest.readings import Item
from edge_agent.ingest.sources import IDLE_TICK_S
from edge_agent.ingest.sources.lines import Oversize
from edge_agent.mqtt.session import new_client

log = logging.getLogger(__name__)


class MqttTopicSource:
    """Subscribes to ``source.path`` (a topic filter) on ``source.host:source.port``.

    Messages wait in a bounded queue (10 x ``model.max_batch``); when it is full
    the oldest waiting reading is kept and the new one is dropped and counted,
    so a flood cannot grow memory.
    """

    def __init__(
        self,
        settings: Settings,
        max_line_bytes: int,
        batch: int,
        frames: FrameDecoder | None = None,
    ) -> None:
        s = settings.source
        if not s.path or s.path == "-":
            raise ConfigError("source.path must be a topic for an mqtt source")
        self.topic = s.path
        self.cap = max_line_bytes
        self.frames = frames  # decodes each message as a binary frame; None: JSON lines
        self.batch = batch
        self.dropped = 0
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=10 * batch)
        #: Set once the broker has granted the subscription (readings published from then on
        #: reach the agent); cleared while disconnected.
        self.subscribed = threading.Event()
        self.client = new_client(s, f"edge-agent-source-{settings.device_id}")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self.subscribed.clear()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 10)
        try:
            self.client.connect(s.host, s.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"mqtt source {s.host}:{s.port}: cannot connect: {exc}") from exc
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, _ud: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.error("mqtt source: broker refused the connection: %s", rc)
            return
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, _c: mqtt.Client, _ud: Any, _mid: int, codes: Any, _p: Any) -> None:
        if all(not rc.is_failure for rc in codes):
            self.subscribed.set()
        else:
            log.error("mqtt source: broker refused the subscription to %s: %s", self.topic, codes)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        item: Item
        if self.frames is not None:
            item = self.frames.decode_item(payload)
        else:
            item = Oversize(len(payload)) if len(payload) > self.cap else payload.strip()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("mqtt source queue full: %d readings dropped", self.dropped)

    def groups(self) -> Iterator[list[Item]]:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_TICK_S)
            except queue.Empty:
                yield []
                continue
            group = [first]
            while len(group) < self.batch:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            yield [item for item in group if not isinstance(item, bytes) or item]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
