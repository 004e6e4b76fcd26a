"""``edge-agent models push``: send a signed release to one device over MQTT and follow it.

The operator's side of rollout.py. It publishes an install command on
``<prefix>/<device>/cmd/model`` — with the signed statement, or with the path of a release
folder already on the device — and listens on ``<prefix>/<device>/model``. When the device asks
for files (``awaiting_files``, with how many bytes of each it already has), the missing bytes
are sent as checksummed chunks on ``<prefix>/<device>/cmd/model/chunk``; a transfer cut short
(either side restarted) resumes where the device's copy ends. It returns the first final
event: ``promoted``, ``refused``, ``selftest_failed``, ``rejected`` (or, for a repeated release,
the outcome the device remembers).
"""

from __future__ import annotations

import base64
import hashlib
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import msgspec
import paho.mqtt.client as mqtt

from edge_agent.config import Settings
from edge_agent.delivery.link import new_client
from edge_agent.errors import LinkError, ReleaseError
from edge_agent.models.release import RELEASE, SIGNATURE, release_id
from edge_agent.rollout.machine import WINDOW_CHUNKS, ModelChunk, ModelCommand
from edge_agent.wire.messages import Topics

#: With no answer at all from the device this long after the command, it is sent again.
COMMAND_RETRY_S = 3.0
FINAL = {"promoted", "committed", "refused", "selftest_failed", "rejected", "rolled_back"}


class _Sender:
    """Sends a release's missing bytes, at most ``WINDOW_CHUNKS`` chunks ahead of what the
    device last said it has; rewinds to the device's copy when it asks to resume, or when it
    has said nothing for a while (a lost chunk or a lost progress report)."""

    def __init__(self, client: mqtt.Client, topic: str, folder: Path, rid: str) -> None:
        self.client = client
        self.topic = topic
        self.folder = folder
        self.rid = rid
        self.sizes: dict[str, int] = {}
        self.have: dict[str, int] = {}
        self.next: dict[str, int] = {}
        self.step = 64 * 1024
        self.last_report = time.monotonic()

    def update(self, details: dict[str, Any]) -> None:
        self.sizes = {str(k): int(v) for k, v in details.get("sizes", {}).items()}
        self.have = {str(k): int(v) for k, v in details.get("have", {}).items()}
        self.step = int(details.get("chunk_bytes", self.step))
        self.last_report = time.monotonic()
        for name, got in self.have.items():
            if details.get("resume") or self.next.get(name, 0) < got:
                self.next[name] = got

    def stalled(self, after_s: float = 5.0) -> bool:
        return bool(self.sizes) and time.monotonic() - self.last_report > after_s

    def rewind(self) -> None:
        self.next = dict(self.have)
        self.last_report = time.monotonic()

    def pump(self) -> None:
        window = WINDOW_CHUNKS * self.step
        for name, size in self.sizes.items():
            while self.next.get(name, 0) < size:
                ahead = sum(max(0, self.next.get(n, 0) - self.have.get(n, 0)) for n in self.sizes)
                if ahead >= window:
                    return
                offset = self.next.get(name, 0)
                with open(self.folder / name, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read(min(self.step, size - offset))
                if not data:
                    raise ReleaseError(f"{self.folder / name}: shorter than the signed size")
                chunk = ModelChunk(
                    v=1,
                    release=self.rid,
                    file=name,
                    offset=offset,
                    data=base64.b64encode(data).decode(),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
                self.client.publish(self.topic, msgspec.json.encode(chunk), qos=1)
                self.next[name] = offset + len(data)

    def fraction(self) -> float:
        total = sum(self.sizes.values()) or 1
        return sum(min(self.have.get(n, 0), s) for n, s in self.sizes.items()) / total


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
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    request = uuid.uuid4().hex[:16]
    client = new_client(settings, f"edge-agent-push-{request}")
    client.on_message = lambda _c, _u, msg: events.put(msgspec.json.decode(msg.payload))
    try:
        client.connect(settings.mqtt.host, settings.mqtt.port, keepalive=30)
    except OSError as exc:
        raise LinkError(f"cannot reach {settings.mqtt.host}:{settings.mqtt.port}: {exc}") from exc
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.loop_start()
    try:
        client.subscribe(topics.model_events(device), qos=1)
        if not subscribed.wait(10):
            raise LinkError(f"could not subscribe to {topics.model_events(device)}")
        cmd = ModelCommand(
            v=1,
            action="install",
            request_id=request,
            path=device_path,
            statement="" if device_path else base64.b64encode(statement).decode(),
            signature="" if device_path else signature.decode(),
        )
        command = msgspec.json.encode(cmd)
        client.publish(topics.model_cmd(device), command, qos=1)
        sent_at, answered = time.monotonic(), False
        sender = _Sender(client, topics.model_chunk(device), folder, rid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ev = events.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
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
            if ev.get("release") != rid and ev.get("request_id") != request:
                continue
            state = ev.get("state", "")
            answered = True
            sender.last_report = time.monotonic()
            if state not in ("received", "awaiting_files"):
                sender.sizes = {}  # the device has every file: nothing more to send
            if state == "awaiting_files":
                sender.update(ev.get("details", {}))
                sender.pump()
                if progress is not None:
                    progress.write(f"\r{device}: receiving files {100 * sender.fraction():3.0f}%")
                continue
            if progress is not None:
                reason = f": {ev['reason']}" if ev.get("reason") else ""
                progress.write(f"\n{device}: {state}{reason}\n")
            if state in FINAL:
                return ev
        raise LinkError(f"no final answer from {device} within {timeout_s:.0f} s")
    finally:
        client.loop_stop()
        client.disconnect()
