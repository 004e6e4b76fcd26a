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

from .config import Settings
from .errors import LinkError, ReleaseError
from .link import new_client
from .messages import Topics
from .release import RELEASE, SIGNATURE, release_id
from .rollout import ModelChunk, ModelCommand

FINAL = {"promoted", "committed", "refused", "selftest_failed", "rejected", "rolled_back"}


def _chunks(folder: Path, name: str, start: int, *, size: int, step: int, rid: str) -> list[bytes]:
    out = []
    with open(folder / name, "rb") as fh:
        fh.seek(start)
        offset = start
        while offset < size:
            data = fh.read(min(step, size - offset))
            if not data:
                break
            out.append(
                msgspec.json.encode(
                    ModelChunk(
                        v=1,
                        release=rid,
                        file=name,
                        offset=offset,
                        data=base64.b64encode(data).decode(),
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                )
            )
            offset += len(data)
    return out


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
        client.publish(topics.model_cmd(device), msgspec.json.encode(cmd), qos=1)
        sent: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ev = events.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if ev.get("release") != rid and ev.get("request_id") != request:
                continue
            state = ev.get("state", "")
            if progress is not None:
                reason = f": {ev['reason']}" if ev.get("reason") else ""
                progress.write(f"{device}: {state}{reason}\n")
            if state == "awaiting_files":
                _send_missing(
                    client,
                    topics=topics,
                    device=device,
                    folder=folder,
                    rid=rid,
                    ev=ev,
                    sent=sent,
                    progress=progress,
                )
            elif state in FINAL:
                return ev
        raise LinkError(f"no final answer from {device} within {timeout_s:.0f} s")
    finally:
        client.loop_stop()
        client.disconnect()


def _send_missing(
    client: mqtt.Client,
    *,
    topics: Topics,
    device: str,
    folder: Path,
    rid: str,
    ev: dict[str, Any],
    sent: dict[str, int],
    progress: IO[str] | None,
) -> None:
    details = ev.get("details", {})
    have: dict[str, int] = details.get("have", {})
    sizes: dict[str, int] = details.get("sizes", {})
    step = int(details.get("chunk_bytes", 64 * 1024))
    total = sum(sizes.values()) or 1
    for name, size in sizes.items():
        got = int(have.get(name, 0))
        if got >= size or sent.get(name, 0) > got:
            continue  # complete, or already on its way
        for i, chunk in enumerate(_chunks(folder, name, got, size=size, step=step, rid=rid)):
            info = client.publish(topics.model_chunk(device), chunk, qos=1)
            info.wait_for_publish(30)
            if progress is not None and i % 16 == 0:
                done = sum(min(sizes[n], max(sent.get(n, 0), have.get(n, 0))) for n in sizes)
                progress.write(f"\r{device}: sending {name} ({100 * done // total}% of release)")
        sent[name] = size
        if progress is not None:
            progress.write(f"\r{device}: sent {name} ({size} bytes)\n")
