"""A release's files over MQTT, in chunks: the device's receiving side and the operator's
sending side (``models push``).

The device writes each file as ``<name>.part`` in ``incoming/<release id>/``, strictly in
order, and renames it once complete and synced. It reports what it has every
``PROGRESS_EVERY`` chunks (and asks to resume from its copy when a chunk is missing); the
sender keeps at most ``WINDOW_CHUNKS`` chunks beyond that, so the device's command queue
never overflows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import ReleaseError
from edge_agent.models.release import RELEASE, SIGNATURE, Release, check_name, read_statement
from edge_agent.models.store import ModelStore
from edge_agent.wire.messages import DECODE_ERRORS, ModelChunk, ModelCommand

#: The device reports how far it got every this many chunks.
PROGRESS_EVERY = 8
#: The sender keeps at most this many chunks beyond the device's last report.
WINDOW_CHUNKS = 32
#: The most of a statement a device reads from an install command.
MAX_STATEMENT_BYTES = 256 * 1024


@dataclass(slots=True)
class Receiving:
    """A release coming over MQTT in chunks, into ``folder`` (its staging folder)."""

    release_id: str
    statement: Release
    folder: Path
    request_id: str
    last_ask: float = 0.0
    chunks: int = 0

    @property
    def sizes(self) -> dict[str, int]:
        return self.statement.sizes()

    def have(self) -> dict[str, int]:
        """Bytes of each file on disk so far (complete or still ``.part``)."""
        have = {}
        for name in self.sizes:
            done = self.folder / name
            part = self.folder / (name + ".part")
            if done.exists():
                have[name] = done.stat().st_size
            else:
                have[name] = part.stat().st_size if part.exists() else 0
        return have

    def missing(self, have: dict[str, int]) -> dict[str, int]:
        """The files not yet complete, with their signed sizes."""
        return {
            n: s for n, s in self.sizes.items() if have[n] < s or not (self.folder / n).exists()
        }

    def take(self, payload: bytes) -> str:
        """Write one chunk message; returns what happened: ``malformed``, ``unexpected``,
        ``corrupt``, ``duplicate``, ``out_of_order`` (nothing written), ``written`` or
        ``file_done`` (the file is complete, synced and renamed)."""
        try:
            chunk = msgspec.json.decode(payload, type=ModelChunk)
            data = base64.b64decode(chunk.data, validate=True)
        except (*DECODE_ERRORS, binascii.Error, ValueError):
            return "malformed"
        size = self.sizes.get(chunk.file)
        if chunk.release != self.release_id or size is None:
            return "unexpected"
        refused = self._refuse(chunk, data, size)
        if refused:
            return refused
        part = self.folder / (chunk.file + ".part")
        have = part.stat().st_size if part.exists() else 0
        complete = have + len(data) == size
        with open(part, "ab") as fh:
            fh.write(data)
            if complete:  # on disk before it gets its name
                fh.flush()
                os.fsync(fh.fileno())
        self.chunks += 1
        if complete:
            os.replace(part, self.folder / chunk.file)
            return "file_done"
        return "written"

    def _refuse(self, chunk: ModelChunk, data: bytes, size: int) -> str:
        """Why a chunk is not written now ("" when it is the next bytes of its file)."""
        if hashlib.sha256(data).hexdigest() != chunk.sha256:
            return "corrupt"
        part = self.folder / (check_name(chunk.file) + ".part")
        have = part.stat().st_size if part.exists() else 0
        if (self.folder / chunk.file).exists() or chunk.offset + len(data) <= have:
            return "duplicate"
        if chunk.offset != have or have + len(data) > size:
            return "out_of_order"
        return ""


def stage_statement(
    store: ModelStore, cmd: ModelCommand, keys: list[tuple[str, Ed25519PublicKey]]
) -> tuple[str, Release, Path]:
    """Check the signed statement an install command carries; returns the release id, the
    statement and a probe folder holding ``release.json`` and ``release.sig`` (the caller
    moves them to staging or removes the probe). Raises ReleaseError."""
    try:
        body = base64.b64decode(cmd.statement, validate=True)
        sig = base64.b64decode(cmd.signature, validate=True)
    except (binascii.Error, ValueError):
        raise ReleaseError("statement/signature not base64") from None
    probe = store.incoming / ".probe"
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir(parents=True)
    (probe / RELEASE).write_bytes(body[:MAX_STATEMENT_BYTES])
    (probe / SIGNATURE).write_bytes(base64.b64encode(sig))
    try:
        rid, statement, _ = read_statement(probe, keys)
    except ReleaseError:
        shutil.rmtree(probe, ignore_errors=True)
        raise
    return rid, statement, probe


def copy_release(source: Path, staging: Path, statement: Release, max_file_bytes: int) -> None:
    """Copy a release folder on the device into staging: only the files its signed statement
    names (and the statement and signature), each at most ``max_file_bytes``."""
    for name in (RELEASE, SIGNATURE, *statement.names()):
        src = source / check_name(name)
        size = src.stat().st_size
        if size > max_file_bytes:
            raise ReleaseError(f"{src.name}: {size} bytes, over rollout.max_file_bytes")
        with open(src, "rb") as fin, open(staging / name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def unfinished(store: ModelStore, keys: list[tuple[str, Ed25519PublicKey]]) -> Receiving | None:
    """After a restart: the newest release whose files were still coming (older unfinished
    ones, and one whose statement no longer checks out, are removed)."""
    if not store.incoming.is_dir():
        return None
    folders = sorted(
        (d for d in store.incoming.iterdir() if d.is_dir() and d.name != ".probe"),
        key=lambda d: d.stat().st_mtime,
    )
    for folder in folders[:-1]:
        shutil.rmtree(folder, ignore_errors=True)
    if not folders:
        return None
    folder = folders[-1]
    try:
        rid, statement, _ = read_statement(folder, keys)
    except ReleaseError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if rid != folder.name:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return Receiving(rid, statement, folder, "")


class Sender:
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
