"""Binary reading frames validated into readings (the format: ``wire/frames.py``, docs/frames.md).

``FrameDecoder.decode`` turns one frame (a datagram, an MQTT message, a slice of a
stream) into a ``Reading`` whose values are a zero-copy view of the received buffer,
or raises ``ReadingError`` with a stable code from ``readings.REASONS``: the size
first (``too_large``), then the header (``bad_frame``, ``unsupported_frame``), the
shape (``wrong_shape``), the exact length (``bad_frame``), the id (``invalid_utf8``)
and finite values (``non_finite``).

``FrameStream`` cuts a byte stream (stdin, a file, a FIFO) into frames: each header
says how long its frame is. A frame whose header is unusable (bad magic, unknown
version, dtype or flags, reserved bits) is rejected once and the stream resynchronises
at the next ``EAFR`` magic; a frame over the size limit is rejected and its bytes are
skipped unread; a stream that ends inside a frame rejects that tail as ``bad_frame``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError, ReadingError
from edge_agent.ingest.readings import Item, Reading
from edge_agent.wire.frames import (
    DTYPE_FLOAT32,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAGIC,
    TIMESTAMP,
    VERSION,
    values_offset,
)

Buffer = bytes | bytearray | memoryview

# Bound once: the decode path runs per reading.
_unpack_header = HEADER.unpack_from
_ndarray = np.ndarray
_F32 = np.dtype("<f4")  # the wire order (native on x86-64 and aarch64)
_isnan = math.isnan
_vdot = np.vdot
_unpack_time = TIMESTAMP.unpack_from
_monotonic_ns = time.monotonic_ns
#: Stands for "check this frame in full" in ``decode_many``.
_BAD_ID = object()


def _layout(buf: Buffer, start: int) -> tuple[int, bytes, int, int, int, bool]:
    """What ``decode_many`` compares the next frames with, of a frame ``_header`` passed:
    its length, header bytes after the magic, where its id starts and ends, where its values
    start, and whether it carries a time."""
    flags, id_len = buf[6], buf[7]
    id_at = HEADER_SIZE + (TIMESTAMP.size if flags else 0)
    return len(buf), bytes(buf[4:HEADER_SIZE]), id_at, id_at + id_len, start, bool(flags)


#: Frames that arrived together from which ``decode_many`` first tries them as one matrix.
UNIFORM_MIN = 8

#: A placeholder in ``decode_many``'s output until the frame's values are checked.
_PENDING = ReadingError("bad_frame", "not decoded")


class FrameDecoder:
    """Validates version-1 frames for one model input shape (channels, samples).

    ``max_frame_bytes`` is the cap above which a frame is refused before its header
    is read. The returned values alias ``buf`` (read-only when ``buf`` is ``bytes``):
    a caller that reuses its receive buffer must copy first.
    """

    def __init__(self, shape: tuple[int, ...], max_frame_bytes: int = 1024 * 1024) -> None:
        if len(shape) != 2 or not all(0 < d <= 0xFFFF for d in shape):
            raise ConfigError(
                f"binary frames carry channels x samples windows; the pack's shape is {shape}"
            )
        self.shape = (int(shape[0]), int(shape[1]))
        self.max_frame_bytes = max_frame_bytes
        self._count = self.shape[0] * self.shape[1]
        self._nbytes = 4 * self._count
        smallest = HEADER_SIZE + self._nbytes
        if max_frame_bytes < smallest:
            raise ConfigError(
                f"input.max_frame_bytes = {max_frame_bytes} is below the {smallest} bytes"
                f" of a frame of the pack's shape {list(self.shape)}"
            )
        # finite x 0 is 0 and NaN/Inf x 0 is NaN: the dot with zeros is NaN exactly when a
        # value is not finite (float32 in, nothing can overflow); ~2x cheaper than the float64
        # sum of JSON input (whose numbers may be out of float32 range). np.vdot, unlike
        # ndarray.dot, does not turn the invalid-operation flag of Inf x 0 into a warning
        # (unit/test_frames.py fails if it ever does: warnings are errors there).
        self._zeros = np.zeros(self.shape, dtype=np.float32)

    def frame_length(self, buf: Buffer, pos: int = 0) -> int:
        """The length the header at ``buf[pos:]`` (16 bytes at least) implies.

        Raises ``ReadingError`` (``bad_frame`` / ``unsupported_frame``) when the header
        cannot be trusted to say it. The shape is not checked here.
        """
        magic, version, dtype, flags, id_len, channels, samples, reserved = HEADER.unpack_from(
            buf, pos
        )
        if magic != MAGIC or version != VERSION or dtype != DTYPE_FLOAT32 or flags & ~KNOWN_FLAGS:
            raise _header_error(magic, version, dtype, flags)
        if reserved:
            raise ReadingError("bad_frame", f"reserved header field is {reserved:#x}, not 0")
        count = channels * samples if channels or samples else self._count
        return values_offset(flags, id_len) + 4 * count

    def decode(self, buf: Buffer) -> Reading:
        """Validate one whole frame; raise ReadingError on any defect."""
        rid, ts, start = self._header(buf)
        # Zero-copy: the window is a view of ``buf`` (what np.frombuffer(...).reshape() gives,
        # one call cheaper).
        arr = _ndarray(self.shape, _F32, buf, start)
        if _isnan(_vdot(arr, self._zeros)):
            raise ReadingError("non_finite", "values hold NaN or Infinity")
        reading = Reading(arr, rid)  # positional: keywords cost ~0.3 us here
        if ts is not None:
            reading.timestamp_ns = ts
        return reading

    def decode_many(self, bufs: Sequence[Buffer]) -> list[Reading | ReadingError]:
        """``decode_item`` for frames that arrived together (a micro-batch), in order.

        The valid frames' values are copied once into one block [n, channels, samples] and
        checked for finiteness in one product; each reading's values are a row of the block
        (``Reading.block``), which the scorer then takes as its input as it is.
        """
        if len(bufs) >= UNIFORM_MIN:
            alike = self._uniform(bufs)
            if alike is not None:
                return alike
        out: list[Reading | ReadingError] = []
        at: list[int] = []  # where each valid frame's reading goes in ``out``
        ids: list[Any] = []
        times: list[int | None] = []
        parts: list[memoryview] = []
        nbytes = self._nbytes
        # A frame whose length and header bytes after the magic equal those of the last frame
        # checked in full passes every check of the header but the magic, the padding and its
        # id's UTF-8, which are checked here; the others take ``_header``.
        like: tuple[int, bytes, int, int, int, bool] | None = None
        rid: Any
        for buf in bufs:
            if (
                like is not None
                and len(buf) == like[0]
                and buf[4:HEADER_SIZE] == like[1]
                and buf[:4] == MAGIC
                and not any(buf[like[3] : like[4]])
            ):
                _, _, id_at, id_end, start, timed = like
                try:
                    rid = str(buf[id_at:id_end], "utf-8") if id_end > id_at else None
                except UnicodeDecodeError:
                    rid = _BAD_ID
                ts = _unpack_time(buf, HEADER_SIZE)[0] if timed else None
            else:
                rid = _BAD_ID
            if rid is _BAD_ID:
                try:
                    rid, ts, start = self._header(buf)
                except ReadingError as err:
                    out.append(err)
                    continue
                like = _layout(buf, start)
            at.append(len(out))
            ids.append(rid)
            times.append(ts)
            parts.append(memoryview(buf)[start : start + nbytes])
            out.append(_PENDING)
        if not parts:
            return out
        # One copy of all the values (read-only, like a single frame's view of its bytes).
        block = np.frombuffer(b"".join(parts), dtype=_F32).reshape(len(parts), *self.shape)
        sums = block.reshape(len(parts), -1) @ self._zeros.reshape(-1)  # NaN: not finite
        now = _monotonic_ns()
        for row, (pos, rid, ts, total) in enumerate(
            zip(at, ids, times, sums.tolist(), strict=True)
        ):
            if _isnan(total):
                out[pos] = ReadingError("non_finite", "values hold NaN or Infinity")
            else:
                out[pos] = Reading(block[row], rid, 0, now, ts, block, row)
        return out

    def _uniform(self, bufs: Sequence[Buffer]) -> list[Reading | ReadingError] | None:
        """``decode_many`` of frames laid out alike (one length, one header but the id's
        bytes: one sensor's stream), checked as one byte matrix instead of frame by frame.
        None when they are not alike or one of them is malformed: the frame-by-frame path
        then says which and why. A frame whose values are not finite is rejected here."""
        first = bufs[0]
        size = len(first)
        if any(len(b) != size for b in bufs):
            return None
        try:
            _, _, start = self._header(first)
        except ReadingError:
            return None
        n = len(bufs)
        raw = np.frombuffer(b"".join(bufs), dtype=np.uint8).reshape(n, size)
        id_at = HEADER_SIZE + (TIMESTAMP.size if first[6] else 0)
        id_end = id_at + first[7]
        # The header bytes are the first frame's (which passed every check), the padding
        # after the id is zero.
        if (raw[:, :HEADER_SIZE] != raw[0, :HEADER_SIZE]).any() or raw[:, id_end:start].any():
            return None
        try:
            ids = [str(b[id_at:id_end], "utf-8") for b in bufs] if id_end > id_at else [None] * n
        except UnicodeDecodeError:
            return None
        times: list[Any] = (
            np.ascontiguousarray(raw[:, HEADER_SIZE:id_at]).view("<i8").ravel().tolist()
            if id_at > HEADER_SIZE
            else [None] * n
        )
        block = np.ascontiguousarray(raw[:, start:]).view(_F32).reshape(n, *self.shape)
        block.flags.writeable = False  # as a single frame's view of its bytes
        sums = block.reshape(n, -1) @ self._zeros.reshape(-1)  # NaN: not finite
        now = _monotonic_ns()
        out: list[Reading | ReadingError] = [
            Reading(values, rid, 0, now, ts, block, row)
            for row, (values, rid, ts) in enumerate(zip(block, ids, times, strict=True))
        ]
        if _isnan(float(sums.sum())):
            for row in np.flatnonzero(np.isnan(sums)).tolist():
                out[row] = ReadingError("non_finite", "values hold NaN or Infinity")
        return out

    def _header(self, buf: Buffer) -> tuple[Any, int | None, int]:
        """Check everything but the values; the id, timestamp and where the values start."""
        n = len(buf)
        if n > self.max_frame_bytes:
            raise ReadingError(
                "too_large", f"frame of {n} bytes is over the {self.max_frame_bytes}-byte limit"
            )
        if n < HEADER_SIZE:
            raise ReadingError("bad_frame", f"{n} bytes is shorter than the 16-byte frame header")
        magic, version, dtype, flags, id_len, channels, samples, reserved = _unpack_header(buf)
        # flags > KNOWN_FLAGS: a bit other than bit 0, the one flag version 1 knows.
        if magic != MAGIC or version != VERSION or dtype != DTYPE_FLOAT32 or flags > KNOWN_FLAGS:
            raise _header_error(magic, version, dtype, flags)
        if reserved:
            raise ReadingError("bad_frame", f"reserved header field is {reserved:#x}, not 0")
        if (channels or samples) and (channels, samples) != self.shape:
            raise ReadingError(
                "wrong_shape",
                f"frame has shape [{channels}, {samples}], expected {list(self.shape)}",
            )
        rid = ts = None
        start = HEADER_SIZE
        if flags or id_len:
            id_at = HEADER_SIZE + 8 if flags else HEADER_SIZE  # flags is 0 or FLAG_TIMESTAMP
            id_end = id_at + id_len
            start = (id_end + 7) & ~7  # wire.frames.values_offset, inlined
            if n != start + self._nbytes:
                raise self._length_error(n, start)
            if start > id_end and any(buf[id_end:start]):
                raise ReadingError("bad_frame", "padding before the values is not zero")
            if id_len:
                try:
                    rid = str(buf[id_at:id_end], "utf-8")
                except UnicodeDecodeError as exc:
                    raise ReadingError(
                        "invalid_utf8", f"frame id: invalid UTF-8 at byte {exc.start}"
                    ) from None
            if flags:
                ts = _unpack_time(buf, HEADER_SIZE)[0]
        elif n != start + self._nbytes:
            raise self._length_error(n, start)
        return rid, ts, start

    def decode_item(self, buf: Buffer) -> Reading | ReadingError:
        """``decode`` for sources: the rejection is returned (to be counted), not raised."""
        try:
            return self.decode(buf)
        except ReadingError as err:
            return err

    def _length_error(self, n: int, start: int) -> ReadingError:
        return ReadingError(
            "bad_frame", f"frame of {n} bytes; its header implies {start + self._nbytes}"
        )


def _header_error(magic: bytes, version: int, dtype: int, flags: int) -> ReadingError:
    if magic != MAGIC:
        return ReadingError("bad_frame", f"magic is {magic!r}, not {MAGIC!r}")
    if version != VERSION:
        return ReadingError("unsupported_frame", f"frame version {version}; this decoder reads 1")
    if dtype != DTYPE_FLOAT32:
        return ReadingError("unsupported_frame", f"dtype {dtype}; version 1 knows 1 (float32) only")
    return ReadingError("unsupported_frame", f"unknown flag bits {flags & ~KNOWN_FLAGS:#04x}")


class FrameStream:
    """Frames back to back in a byte stream, fed in chunks as they are read.

    ``feed`` returns the readings and rejections of the frames completed by a chunk;
    ``end`` those of a stream that stops inside a frame. Memory stays bounded by
    ``max_frame_bytes`` plus one chunk: a frame over the limit is skipped, not held.
    """

    def __init__(self, decoder: FrameDecoder) -> None:
        self.decoder = decoder
        self._rest = b""
        self._skip = 0  # bytes of an oversize frame still to drop
        self._resync = False  # after a bad header: dropping bytes up to the next magic
        #: Bytes dropped while resynchronising after bad headers (each run counted once,
        #: as the rejection of the header that started it).
        self.skipped_bytes = 0

    def feed(self, data: bytes) -> list[Item]:
        buf = self._rest + data if self._rest else data
        out: list[Any] = []  # rejections, and frames until decode_group decodes them
        pos, n = 0, len(buf)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                pos, self._skip = pos + step, self._skip - step
                continue
            if self._resync:
                found = buf.find(MAGIC, pos)
                if found < 0:
                    keep = max(pos, n - (len(MAGIC) - 1))  # a magic may straddle two chunks
                    self.skipped_bytes += keep - pos
                    pos = keep
                    break
                self.skipped_bytes += found - pos
                pos, self._resync = found, False
            if n - pos < HEADER_SIZE:
                break
            try:
                size = self.decoder.frame_length(buf, pos)
            except ReadingError as err:
                out.append(err)
                self._resync = True
                pos += 1
                continue
            if size > self.decoder.max_frame_bytes:
                out.append(self._oversize(size))
                self._skip = size
                continue
            if n - pos < size:
                break
            out.append(memoryview(buf)[pos : pos + size])  # decoded with the others, below
            pos += size
        self._rest = buf[pos:]
        return decode_group(self.decoder, out)

    def _oversize(self, size: int) -> ReadingError:
        cap = self.decoder.max_frame_bytes
        return ReadingError("too_large", f"frame of {size} bytes is over the {cap}-byte limit")

    def end(self) -> list[Item]:
        """What is left when the stream ends: a truncated frame is rejected, once."""
        rest, self._rest = self._rest, b""
        if self._skip or self._resync or not rest:
            return []  # already rejected (oversize frame, bad header)
        return [
            ReadingError(
                "bad_frame", f"the stream ended inside a frame ({len(rest)} bytes of it came)"
            )
        ]


def decode_group(decoder: FrameDecoder, items: list[Any]) -> list[Item]:
    """The frames (bytes or memoryviews) among ``items`` decoded together (``decode_many``:
    one block of values), each in its place among the items already decided (rejections)."""
    frames = [item for item in items if isinstance(item, (bytes, memoryview))]
    if not frames:
        return items
    # One frame (the latency path) is a view of its own bytes; a block only pays for several.
    decoded = iter(
        decoder.decode_many(frames) if len(frames) > 1 else [decoder.decode_item(frames[0])]
    )
    return [next(decoded) if isinstance(item, (bytes, memoryview)) else item for item in items]


def frame_groups(chunks: Iterator[bytes], decoder: FrameDecoder) -> Iterator[list[Item]]:
    """One group per chunk read (the frames it completed), then the stream's end."""
    stream = FrameStream(decoder)
    for chunk in chunks:
        yield stream.feed(chunk) if chunk else []
    tail = stream.end()
    if tail:
        yield tail
