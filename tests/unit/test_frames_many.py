"""Frames decoded together (``FrameDecoder.decode_many``, the micro-batch path) give exactly
what decoding each alone gives: the same rejection codes, the same values to the bit, ids and
times, in order; and the valid ones are rows of one block (the scorer takes it as its input
as is when the group is that whole block)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import ReadingError
from edge_agent.ingest.frames import FrameDecoder
from edge_agent.ingest.readings import Reading
from edge_agent.wire.frames import encode_frame

SHAPE = (3, 5)
DECODER = FrameDecoder(SHAPE, max_frame_bytes=512)

finite = st.floats(-1e6, 1e6, width=32)
values = st.lists(finite, min_size=15, max_size=15).map(
    lambda v: np.asarray(v, dtype=np.float32).reshape(SHAPE)
)
ids = st.one_of(st.none(), st.text(max_size=12))
times = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_frame(draw(values), draw(ids), draw(times)))
    damage = draw(st.integers(0, 6))
    if damage == 1:  # one byte anywhere changed
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif damage == 2:  # cut short
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif damage == 3:  # a NaN among the values
        arr = np.frombuffer(bytes(data[-60:]), dtype=np.float32).copy()
        arr[draw(st.integers(0, 14))] = np.nan
        data[-60:] = arr.tobytes()
    elif damage == 4:  # bytes appended
        data += b"\0" * draw(st.integers(1, 9))
    return bytes(data)


def _same(a: Reading | ReadingError, b: Reading | ReadingError) -> None:
    if isinstance(b, ReadingError):
        assert isinstance(a, ReadingError), (a, b)
        assert a.code == b.code
        return
    assert isinstance(a, Reading), (a, b)
    assert a.values.tobytes() == b.values.tobytes()
    assert (a.id, a.timestamp_ns) == (b.id, b.timestamp_ns)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(frames=st.lists(frame(), max_size=40), repeat=st.integers(0, 3))
def test_decode_many_is_decode_item_of_each(frames: list[bytes], repeat: int) -> None:
    # Runs of frames of one layout too (the fast comparison with the frame before).
    frames = frames + frames[:1] * repeat
    together = DECODER.decode_many(frames)
    assert len(together) == len(frames)
    for a, buf in zip(together, frames, strict=True):
        _same(a, DECODER.decode_item(buf))
    valid = [r for r in together if isinstance(r, Reading)]
    if valid:
        block = valid[0].block
        assert block is not None
        assert all(r.block is block for r in valid)
        rows = [r.row for r in valid]
        assert rows == sorted(set(rows))
        assert all(block[r.row].tobytes() == r.values.tobytes() for r in valid)


def test_a_bad_frame_among_good_ones_of_the_same_layout() -> None:
    good = [encode_frame(np.full(SHAPE, i, np.float32), f"id-{i}", 1000 + i) for i in range(6)]
    bad_magic = b"XAFR" + good[0][4:]
    bad_id = bytearray(good[1])
    bad_id[24] = 0xFF  # the id's first byte: not UTF-8
    padded = encode_frame(np.ones(SHAPE, np.float32), "abc")  # id of 3 bytes: 5 of padding
    dirty_pad = bytearray(padded)
    dirty_pad[19 + 1] = 7
    frames = [*good[:2], bad_magic, good[2], bytes(bad_id), good[3], padded, bytes(dirty_pad)]
    out = DECODER.decode_many(frames)
    codes = [r.code if isinstance(r, ReadingError) else r.id for r in out]
    assert codes == [
        *("id-0", "id-1", "bad_frame", "id-2"),
        *("invalid_utf8", "id-3", "abc", "bad_frame"),
    ]


@st.composite
def uniform_group(draw: st.DrawFn) -> list[bytes]:
    """8 to 40 frames of one layout (one id length, a time or none, as one sensor sends
    them), at most one of them damaged in a way that keeps its length."""
    n = draw(st.integers(8, 40))
    id_len = draw(st.integers(0, 12))
    timed = draw(st.booleans())
    frames = [
        encode_frame(
            draw(values),
            "".join(draw(st.lists(st.sampled_from("ab7-é"), min_size=id_len, max_size=id_len)))
            or None,
            draw(times.filter(lambda t: t is not None)) if timed else None,
        )
        for _ in range(n)
    ]
    # Keep one layout: an id of that many characters may take more bytes (é is two).
    frames = [f for f in frames if len(f) == len(frames[0])]
    if len(frames) < 8:
        frames = [frames[0]] * 8
    at = draw(st.integers(0, len(frames) - 1))
    data = bytearray(frames[at])
    damage = draw(st.integers(0, 5))
    if damage == 1:  # a header byte
        data[draw(st.integers(0, 15))] ^= draw(st.integers(1, 255))
    elif damage == 2:  # a NaN among the values
        arr = np.frombuffer(bytes(data[-60:]), dtype=np.float32).copy()
        arr[draw(st.integers(0, 14))] = np.nan
        data[-60:] = arr.tobytes()
    elif damage == 3 and len(data) - 60 > 16:  # a byte before the values: time, id, padding
        data[draw(st.integers(16, len(data) - 61))] ^= draw(st.integers(1, 255))
    frames[at] = bytes(data)
    return frames


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(frames=uniform_group())
def test_frames_of_one_layout_decoded_as_one_matrix_are_decode_item_of_each(
    frames: list[bytes],
) -> None:
    """The matrix path of ``decode_many`` (frames of one length and header) gives what each
    frame alone gives, a damaged one among them included; valid values are rows of one
    read-only block."""
    together = DECODER.decode_many(frames)
    assert len(together) == len(frames)
    for a, buf in zip(together, frames, strict=True):
        _same(a, DECODER.decode_item(buf))
    valid = [r for r in together if isinstance(r, Reading)]
    block = valid[0].block if valid else None
    assert all(r.block is block for r in valid)
    if block is not None:
        assert not block.flags.writeable
