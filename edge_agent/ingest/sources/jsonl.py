"""JSON lines from a file, a FIFO or stdin."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

from edge_agent.errors import ConfigError
from edge_agent.ingest.readings import Item
from edge_agent.ingest.sources import IDLE_TICK_S
from edge_agent.ingest.sources.lines import chunked_lines


class JsonlSource:
    def __init__(self, path: str, max_line_bytes: int) -> None:
        self.path = path
        self.cap = max_line_bytes
        if path == "-":
            self.fd, self._owned = sys.stdin.fileno(), False
        else:
            try:
                self.fd, self._owned = os.open(path, os.O_RDONLY), True
            except OSError as exc:
                raise ConfigError(f"source.path {path}: cannot open: {exc.strerror}") from exc

    def groups(self) -> Iterator[list[Item]]:
        for group in chunked_lines(self.fd, self.cap, idle_s=IDLE_TICK_S):
            yield list[Item](group)

    def close(self) -> None:
        if self._owned:
            os.close(self.fd)
            self._owned = False
