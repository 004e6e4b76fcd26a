"""Replay of a dataset file (JSON lines of windows), at a set rate or as fast as possible.

With ``noise`` > 0, Gaussian noise of ``noise`` times each channel's standard
deviation (within the window) is added to every replayed window, seeded, so a
demo can show what a noisy sensor does to the hybrid split. With
``shift_channel`` >= 0, one channel of every window from the ``shift_after``-th
replayed reading on becomes ``value x shift_gain + shift_offset``: a sensor
that lost its calibration, for trying drift monitoring (docs/drift.md). Lines
that are not valid readings are replayed as they are, to be rejected and counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from edge_agent.errors import ConfigError
from edge_agent.ingest.readings import Item, Oversize


class _Window(msgspec.Struct):
    values: list[list[float]]
    id: object = None


class ReplaySource:
    def __init__(
        self,
        path: str,
        max_line_bytes: int,
        *,
        rate_hz: float,
        loops: int,
        noise: float,
        seed: int,
        batch: int,
        shift_channel: int = -1,
        shift_offset: float = 0.0,
        shift_gain: float = 1.0,
        shift_after: int = 0,
    ) -> None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"source.path {path}: cannot read: {exc.strerror}") from exc
        self.lines = [line for line in raw.splitlines() if line.strip()]
        if not self.lines:
            raise ConfigError(f"source.path {path}: no lines to replay")
        self.cap = max_line_bytes
        self.rate_hz = rate_hz
        self.loops = loops
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.batch = batch
        self.replayed = 0
        self.shift_channel = shift_channel
        self.shift_offset = shift_offset
        self.shift_gain = shift_gain
        self.shift_after = shift_after

    def _transform(self, line: bytes, loop: int, index: int) -> bytes:
        shift = self.shift_channel >= 0 and index >= self.shift_after
        if self.noise == 0 and not shift:
            return line
        try:
            w = msgspec.json.decode(line, type=_Window)
            arr = np.asarray(w.values, dtype=np.float64)
        except (msgspec.MsgspecError, ValueError, UnicodeDecodeError, RecursionError):
            return line  # not a window: replayed unchanged, rejected downstream
        if arr.ndim != 2:
            return line
        if self.noise > 0:
            noise = self.rng.normal(size=arr.shape) * self.noise
            arr = arr + noise * arr.std(axis=1, keepdims=True)
        if shift and 0 <= self.shift_channel < arr.shape[0]:
            arr[self.shift_channel] = arr[self.shift_channel] * self.shift_gain + self.shift_offset
        rid = w.id if loop == 0 else f"{w.id}#{loop}"
        return msgspec.json.encode({"id": rid, "values": np.round(arr, 6).tolist()})

    def groups(self) -> Iterator[list[Item]]:
        loop = 0
        start = time.monotonic()
        while self.loops == 0 or loop < self.loops:
            for i in range(0, len(self.lines), self.batch if self.rate_hz == 0 else 1):
                chunk = self.lines[i : i + (self.batch if self.rate_hz == 0 else 1)]
                if self.noise > 0 or self.shift_channel >= 0:
                    chunk = [
                        self._transform(line, loop, self.replayed + j)
                        for j, line in enumerate(chunk)
                    ]
                if self.rate_hz > 0:
                    due = start + self.replayed / self.rate_hz
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                self.replayed += len(chunk)
                yield [line if len(line) <= self.cap else _oversize(line) for line in chunk]
            loop += 1

    def close(self) -> None:
        self.lines = []


def _oversize(line: bytes) -> Item:
    return Oversize(len(line))
