"""Cutting a stream of samples into the model's windows."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edge_agent.errors import ReadingError
from edge_agent.ingest.readings import Item, Reading, SampleDecoder
from edge_agent.ingest.sources import Source
from edge_agent.ingest.sources.lines import Oversize


class Windowed:
    """Wraps a source whose lines carry samples; yields ``Reading`` windows.

    A window of ``shape[1]`` samples is emitted every ``hop`` samples. Rejected
    sample lines are passed on as their ``ReadingError`` (counted downstream)
    and do not enter the window. A window's id is the id of its last sample.
    """

    def __init__(self, inner: Source, shape: tuple[int, ...], hop: int, cap: int) -> None:
        self.inner = inner
        self.channels, self.length = shape[0], shape[1]
        self.hop = hop
        self.decoder = SampleDecoder(self.channels, cap)
        self._buf = np.zeros((0, self.channels), dtype=np.float32)
        self._since = 0  # samples since the last emitted window

    def groups(self) -> Iterator[list[Item]]:
        for group in self.inner.groups():
            out: list[Item] = []
            for item in group:
                if isinstance(item, (Reading, ReadingError)):
                    out.append(item)
                    continue
                if isinstance(item, Oversize):
                    out.append(ReadingError("too_large", f"line of {item.size} bytes is too long"))
                    continue
                try:
                    sample = self.decoder.decode(item)
                except ReadingError as err:
                    out.append(err)
                    continue
                out.extend(self._push(sample))
            yield out

    def _push(self, sample: Reading) -> list[Item]:
        self._buf = np.concatenate([self._buf, sample.values])
        self._since += sample.values.shape[0]
        out: list[Item] = []
        while self._buf.shape[0] >= self.length and self._since >= self.hop:
            # The newest full window, then keep what the next window will need.
            window = self._buf[: self.length]
            out.append(Reading(values=np.ascontiguousarray(window.T), id=sample.id))
            self._buf = self._buf[self.hop :]
            self._since = max(0, self._since - self.hop)
        keep = max(self.length, self.hop)
        if self._buf.shape[0] > keep:
            self._buf = self._buf[-keep:]
        return out

    def close(self) -> None:
        self.inner.close()
