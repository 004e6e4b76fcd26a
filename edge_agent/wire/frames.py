"""The binary reading frame, version 1: a 16-byte header and the raw float32 values.

docs/frames.md is the reference (byte table, versioning rule, rejection codes).
This module is the format itself, shared by producers and the device: the header
layout, how long a frame is, and ``encode_frame``. Validation into a ``Reading``
lives in ``ingest/frames.py``. Everything is little-endian::

    offset  size  field
    0       4     magic b"EAFR"
    4       1     version (1)
    5       1     dtype (1 = float32)
    6       1     flags (bit 0: an i64 timestamp follows the header; other bits 0)
    7       1     id_len (0..255 bytes of UTF-8; 0 = no id)
    8       2     channels  } both 0 = the model pack's declared shape,
    10      2     samples   } else they must equal it
    12      4     reserved (0)
    16      [8 timestamp, ns since the Unix epoch] [id_len id bytes] [zero padding to a
            multiple of 8] channels x samples float32 values, channel-major
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from edge_agent.errors import FrameError

MAGIC = b"EAFR"
VERSION = 1
#: dtype codes; version 1 knows float32 only.
DTYPE_FLOAT32 = 1
#: flags bit 0: an 8-byte timestamp follows the header.
FLAG_TIMESTAMP = 0x01
KNOWN_FLAGS = FLAG_TIMESTAMP
MAX_ID_BYTES = 255
MAX_DIM = 0xFFFF

#: magic, version, dtype, flags, id_len, channels, samples, reserved.
HEADER = struct.Struct("<4sBBBBHHI")
HEADER_SIZE = HEADER.size  # 16
TIMESTAMP = struct.Struct("<q")
#: The values start at a multiple of this many bytes from the frame's start.
ALIGN = 8


def values_offset(flags: int, id_len: int) -> int:
    """Where the values start, from the frame's start, for these header fields."""
    end = HEADER_SIZE + (TIMESTAMP.size if flags & FLAG_TIMESTAMP else 0) + id_len
    return (end + ALIGN - 1) & ~(ALIGN - 1)


def frame_size(count: int, id_len: int = 0, *, timestamp: bool = False) -> int:
    """Length in bytes of a version-1 frame of ``count`` float32 values."""
    return values_offset(FLAG_TIMESTAMP if timestamp else 0, id_len) + 4 * count


def encode_frame(
    values: Any,
    id: str | None = None,  # noqa: A002 - the field's name in the format and in JSON
    timestamp_ns: int | None = None,
    *,
    declared_shape: bool = False,
) -> bytes:
    """One version-1 frame of ``values`` (channels x samples, converted to float32).

    With ``declared_shape`` the header says 0 x 0 ("the pack's declared shape")
    instead of the array's own shape. Raises ``FrameError`` for values that are
    not a 2-D array with dimensions up to 65535, an id over 255 UTF-8 bytes, or a
    timestamp outside the signed 64-bit range.
    """
    try:
        arr = np.ascontiguousarray(values, dtype="<f4")
    except (TypeError, ValueError) as exc:
        raise FrameError(f"values are not an array of numbers: {exc}") from exc
    if arr.ndim != 2 or not (0 < arr.shape[0] <= MAX_DIM and 0 < arr.shape[1] <= MAX_DIM):
        raise FrameError(f"a frame holds channels x samples (each 1..{MAX_DIM}), not {arr.shape}")
    rid = b"" if id is None else id.encode("utf-8")
    if len(rid) > MAX_ID_BYTES:
        raise FrameError(f"id of {len(rid)} UTF-8 bytes is over the {MAX_ID_BYTES}-byte limit")
    flags = 0 if timestamp_ns is None else FLAG_TIMESTAMP
    channels, samples = (0, 0) if declared_shape else arr.shape
    parts = [HEADER.pack(MAGIC, VERSION, DTYPE_FLOAT32, flags, len(rid), channels, samples, 0)]
    if timestamp_ns is not None:
        try:
            parts.append(TIMESTAMP.pack(timestamp_ns))
        except struct.error as exc:
            raise FrameError(f"timestamp_ns {timestamp_ns} is not a signed 64-bit integer") from exc
    parts.append(rid)
    start = values_offset(flags, len(rid))
    parts.append(bytes(start - sum(len(p) for p in parts)))
    parts.append(arr.tobytes())
    return b"".join(parts)
