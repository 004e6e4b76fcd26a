"""``edge-agent models push``: send a signed release to one device over MQTT and follow it.

The operator's side of the rollout state machine. It publishes an install command on
``<prefix>/<device>/cmd/model`` — with the signed statement, or with the path of a release
folder already on the device — and listens on ``<prefix>/<device>/model``. When the device asks
for files (``awaiting_files``, with how many bytes of each it already has), the missing bytes
are sent as checksummed chunks on ``<prefix>/<device>/cmd/model/chunk`` (``transfer.Sender``);
a transfer cut short (either side restarted) resumes where the device's copy ends. It returns
the first final event: ``promoted``, ``refused``, ``selftest_failed``, ``rejected`` (or, for a
repeated release, the outcome the device remembers).

Events are decoded (strictly, as ``ModelEvent``) in paho's network thread; one that does not
decode is counted in ``malformed`` and skipped, never raised in that thread.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import msgspec
import paho.mqtt.client as mqtt

from edge_agent.config import Settings
from edge_agent.errors import LinkError, ReleaseError
from edge_agent.models.release import RELEASE, SIGNATURE, release_id
from edge_agent.mqtt.session import new_client
from edge_agent.rollout.transfer import Sender
from edge_agent.util.progress import Progress
from edge_agent.wire.messages import (
    DECODE_ERRORS,
    FINAL_STATES,
    ModelCommand,
    ModelEvent,
    Topics,
    decode_failure,
)

log = logging.getLogger(__name__)

#: With no answer at all from the device this long after the command, it is sent again.
COMMAND_RETRY_S = 3.0


class EventInbox:
    """The device's events, decoded on paho's thread into a queue; malformed ones counted."""

    def __init__(self) -> None:
        self.events: queue.Queue[ModelEvent] = queue.Queue()
        self.malformed = 0
        self._decoder = msgspec.json.Decoder(ModelEvent)

    def on_message(self, _client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            ev = self._decoder.decode(msg.payload)
        except DECODE_ERRORS as exc:
            self.malformed += 1
            reason, detail = decode_failure(exc)
            log.warning("ignored an event on %s: %s: %.200s", msg.topic, reason, detail)
            return
        self.events.put(ev)


def _connect(settings: Settings, inbox: EventInbox, events_topic: str) -> mqtt.Client:
    client = new_client(settings, f"edge-agent-push-{uuid.uuid4().hex[:16]}")
    client.on_message = inbox.on_message
    try:
        client.connect(settings.mqtt.host, settings.mqtt.port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise LinkError(f"cannot reach {settings.mqtt.host}:{settings.mqtt.port}: {exc}") from exc
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.loop_start()
    client.subscribe(events_topic, qos=1)
    if not subscribed.wait(10):
        client.loop_stop()
        client.disconnect()
        raise LinkError(f"could not subscribe to {events_topic}")
    return client


def push_release(
    settings: Settings,
    folder: Path,
    device: str,
    *,
    device_path: str = "",
    timeout_s: float = 600.0,
    progress: IO[str] | None = None,
) -> dict[str, Any]:
    """Push the signed release in ``folder`` to ``device``; return the device's final event."""
    try:
        statement = (folder / RELEASE).read_bytes()
        signature = (folder / SIGNATURE).read_bytes().strip()
    except OSError as exc:
        raise ReleaseError(f"{folder}: not a signed release ({exc.strerror})") from exc
    rid = release_id(statement)
    topics = Topics(settings.mqtt.topic_prefix)
    inbox = EventInbox()
    request = uuid.uuid4().hex[:16]
    client = _connect(settings, inbox, topics.model_events(device))
    bar = Progress(1.0, progress, label=f"{device}: receiving files", counts=False)
    try:
        command = msgspec.json.encode(
            ModelCommand(
                v=1,
                action="install",
                request_id=request,
                path=device_path,
                statement="" if device_path else base64.b64encode(statement).decode(),
                signature="" if device_path else signature.decode(),
            )
        )
        client.publish(topics.model_cmd(device), command, qos=1)
        sent_at, answered = time.monotonic(), False
        sender = Sender(client, topics.model_chunk(device), folder, rid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ev = inbox.events.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if not answered and time.monotonic() - sent_at > COMMAND_RETRY_S:
                    # Not subscribed yet (starting, reconnecting): the broker dropped the
                    # command. Commands are idempotent by release id, so send it again.
                    client.publish(topics.model_cmd(device), command, qos=1)
                    sent_at = time.monotonic()
                elif sender.stalled():
                    sender.rewind()
                    sender.pump()
                continue
            if ev.release != rid and ev.request_id != request:
                continue
            answered = True
            sender.last_report = time.monotonic()
            if ev.state not in ("received", "awaiting_files"):
                sender.sizes = {}  # the device has every file: nothing more to send
            if ev.state == "awaiting_files":
                sender.update(ev.details)
                sender.pump()
                bar.update(sender.fraction())
                continue
            if progress is not None:
                reason = f": {ev.reason}" if ev.reason else ""
                progress.write(f"\n{device}: {ev.state}{reason}\n")
            if ev.state in FINAL_STATES:
                result: dict[str, Any] = msgspec.to_builtins(ev)
                return result
        raise LinkError(f"no final answer from {device} within {timeout_s:.0f} s")
    finally:
        client.loop_stop()
        client.disconnect()
