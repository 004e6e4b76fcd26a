"""UDP and Unix datagram sockets: sensor daemons push one JSON line (or frame) per datagram."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from edge_agent.errors import ConfigError, ReadingError
from edge_agent.ingest.frames import FrameDecoder, decode_group
from edge_agent.ingest.readings import Item
from edge_agent.ingest.sources import IDLE_TICK_S
from edge_agent.ingest.sources.lines import Oversize


def _udp_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"source.path {text!r}: a udp source needs host:port")
    return host or "127.0.0.1", int(port)


class DatagramSource:
    def __init__(
        self,
        kind: str,
        path: str,
        max_line_bytes: int,
        batch: int,
        max_wait_s: float,
        *,
        socket_mode: int = 0o660,
        frames: FrameDecoder | None = None,
    ) -> None:
        self.kind = kind
        self.path = path
        self.frames = frames  # decodes each datagram as a binary frame; None: JSON lines
        self.cap = max_line_bytes if frames is None else frames.max_frame_bytes
        self.batch = batch
        self.max_wait_s = max_wait_s
        family = socket.AF_INET if kind == "udp" else socket.AF_UNIX
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if kind == "udp":
                self.sock.bind(_udp_address(path))
            else:
                if Path(path).is_socket():
                    os.unlink(path)  # a stale socket of an earlier run
                self.sock.bind(path)
                # Sensor daemons run as other users; the service's umask would leave 0600.
                os.chmod(path, socket_mode)
        except OSError as exc:
            self.sock.close()
            raise ConfigError(f"source.path {path}: cannot bind a {kind} socket: {exc}") from exc
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.address = self.sock.getsockname()

    def _receive(self) -> Item:
        data, _flags, msg_flags, _addr = self.sock.recvmsg(self.cap + 1)
        if self.frames is not None:
            if msg_flags & socket.MSG_TRUNC:
                return ReadingError("too_large", f"datagram over the {self.cap}-byte frame limit")
            return data  # decoded with the rest of its group (``groups``)
        if len(data) > self.cap or msg_flags & socket.MSG_TRUNC:
            return Oversize(len(data))
        return data.rstrip(b"\r\n")

    def groups(self) -> Iterator[list[Item]]:
        while True:
            readable, _, _ = select.select([self.sock], [], [], IDLE_TICK_S)
            if not readable:
                yield []
                continue
            group: list[Item] = [self._receive()]
            deadline = time.monotonic() + self.max_wait_s
            while len(group) < self.batch:
                wait = deadline - time.monotonic()
                readable, _, _ = select.select([self.sock], [], [], max(0.0, wait))
                if not readable:
                    break
                group.append(self._receive())
            if self.frames is not None:
                yield decode_group(self.frames, group)  # a group's frames: one block
                continue
            yield [item for item in group if not isinstance(item, bytes) or item]

    def close(self) -> None:
        self.sock.close()
        if self.kind == "unix" and Path(self.path).is_socket():
            os.unlink(self.path)
