"""JSON lines, or binary frames back to back, from a file, a FIFO or stdin."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

from edge_agent.errors import ConfigError
from edge_agent.ingest.frames import FrameDecoder, frame_groups
from edge_agent.ingest.readings import Item
from edge_agent.ingest.sources import IDLE_TICK_S
from edge_agent.ingest.sources.lines import chunked_lines, read_chunks


class JsonlSource:
    def __init__(self, path: str, max_line_bytes: int, frames: FrameDecoder | None = None) -> None:
        self.path = path
        self.cap = max_line_bytes
        self.frames = frames  # the stream is binary frames (docs/frames.md); None: JSON lines
        if path == "-":
            self.fd, self._owned = sys.stdin.fileno(), False
        else:
            try:
                self.fd, self._owned = os.open(path, os.O_RDONLY), True
            except OSError as exc:
                raise ConfigError(f"source.path {path}: cannot open: {exc.strerror}") from exc

    def groups(self) -> Iterator[list[Item]]:
        return fd_groups(self.fd, self.cap, self.frames, idle_s=IDLE_TICK_S)

    def close(self) -> None:
        if self._owned:
            os.close(self.fd)
            self._owned = False


def fd_groups(
    fd: int, max_line_bytes: int, frames: FrameDecoder | None = None, idle_s: float | None = None
) -> Iterator[list[Item]]:
    """What each read of ``fd`` completed: JSON lines, or with ``frames`` decoded frames."""
    if frames is not None:
        yield from frame_groups(read_chunks(fd, idle_s=idle_s), frames)
        return
    for group in chunked_lines(fd, max_line_bytes, idle_s=idle_s):
        yield list[Item](group)
