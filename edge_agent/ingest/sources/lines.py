"""Bounded line splitting for JSON-lines input (files, FIFOs, stdin).

Reads raw bytes from a file descriptor and yields the complete lines of each
read as one group, so a caller can batch the lines that arrived together and
still answer a line typed alone at once. A line longer than the cap is never
held in memory: its bytes are skipped up to the next newline and it is
reported as ``Oversize`` with its length. Invalid UTF-8 is left for the
decoder to report.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

from edge_agent.ingest.readings import Line, Oversize

__all__ = ["Line", "Oversize", "chunked_lines", "read_chunks"]


def read_chunks(fd: int, read_size: int = 1 << 20, idle_s: float | None = None) -> Iterator[bytes]:
    """The raw bytes of ``fd`` as they come, until end of input (binary frame streams).

    With ``idle_s``, ``b""`` is yielded whenever no data came for that long.
    """
    while True:
        if idle_s is not None:
            readable, _, _ = select.select([fd], [], [], idle_s)
            if not readable:
                yield b""
                continue
        data = os.read(fd, read_size)
        if not data:
            return
        yield data


def _finish(line: bytes, cap: int) -> Line | None:
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > cap:
        return Oversize(len(line))
    if not line.strip():
        return None  # blank lines carry no reading and get no output
    return line


def chunked_lines(
    fd: int, cap: int, read_size: int = 1 << 20, idle_s: float | None = None
) -> Iterator[list[Line]]:
    """Yield lists of lines, one list per read from ``fd``, until end of input.

    With ``idle_s``, an empty list is yielded whenever no data came for that
    long, so the caller's loop keeps turning (watchdog, deadlines, signals).
    """
    buf = bytearray()
    skipping = False  # inside an oversize line, dropping bytes until its newline
    skipped = 0
    while True:
        if idle_s is not None:
            readable, _, _ = select.select([fd], [], [], idle_s)
            if not readable:
                yield []
                continue
        data = os.read(fd, read_size)
        if not data:
            break
        items: list[Line] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                rest = data[start:]
                if skipping:
                    skipped += len(rest)
                else:
                    buf += rest
                    if len(buf) > cap:
                        skipping, skipped = True, len(buf)
                        buf.clear()
                break
            piece = data[start:nl]
            start = nl + 1
            if skipping:
                items.append(Oversize(skipped + len(piece)))
                skipping, skipped = False, 0
                continue
            if buf:
                buf += piece
                piece = bytes(buf)
                buf.clear()
            finished = _finish(piece, cap)
            if finished is not None:
                items.append(finished)
        if items:
            yield items
    if skipping:
        yield [Oversize(skipped)]
    elif buf:
        last = _finish(bytes(buf), cap)
        if last is not None:
            yield [last]
