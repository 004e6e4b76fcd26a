"""Binary reading frames (docs/frames.md): round trips on the real test windows, every
rejection code counted exactly once, byte streams cut into frames, and hostile bytes."""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import ConfigError, FrameError, ReadingError
from edge_agent.ingest.frames import FrameDecoder, FrameStream, frame_groups
from edge_agent.ingest.readings import REASONS, Reading, ReadingDecoder
from edge_agent.ingest.sources.jsonl import fd_groups
from edge_agent.models.pack import BUNDLED_TEST_DATA, open_pack
from edge_agent.scoring.pipeline import ScorePipeline
from edge_agent.scoring.scorer import Scorer
from edge_agent.wire.frames import HEADER, encode_frame, frame_size
from tests.conftest import make_fake_pack
from tests.unit.test_hostile_input import REJECTION_EXAMPLES

SHAPE = (2, 4)  # the fake pack's
CAP = 4096
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OK = [[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def windows() -> list[dict]:
    return [json.loads(x) for x in BUNDLED_TEST_DATA.read_bytes().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def decoder() -> FrameDecoder:
    return FrameDecoder(SHAPE, CAP)


@pytest.fixture(scope="module")
def fake_scorer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scorer]:
    scorer = Scorer.open(open_pack(make_fake_pack(tmp_path_factory.mktemp("pack") / "fake-pack")))
    yield scorer
    scorer.close()


def header(**fields: int | bytes) -> bytes:
    """A version-1 header for the fake pack's shape, with some fields overridden."""
    h = {"magic": b"EAFR", "version": 1, "dtype": 1, "flags": 0, "id_len": 0}
    h |= {"channels": 2, "samples": 4, "reserved": 0}
    h.update(fields)
    return HEADER.pack(*h.values())


# -- round trips -------------------------------------------------------------------------


def test_every_test_window_round_trips_zero_copy_as_json_decodes_it() -> None:
    """The bundled BasicMotions windows: a frame decodes to the same float32 array as the
    JSON line, with its id and timestamp, and the array is a view of the received bytes."""
    json_decoder = ReadingDecoder((6, 100))
    frames = FrameDecoder((6, 100), 64 * 1024)
    for i, w in enumerate(windows()):
        expected = json_decoder.from_values(w["values"]).values
        cases: list[dict[str, Any]] = [
            {},
            {"id": w["id"]},
            {"id": "é" * 7, "timestamp_ns": -(2**63) + i},
        ]
        for kw in cases:
            data = encode_frame(w["values"], **kw)
            id_len = len(kw.get("id", "").encode())
            assert len(data) == frame_size(600, id_len, timestamp="timestamp_ns" in kw)
            r = frames.decode(data)
            assert r.values.shape == (6, 100)
            assert r.values.dtype == np.float32
            assert np.array_equal(r.values, expected)
            assert r.id == kw.get("id")
            assert r.timestamp_ns == kw.get("timestamp_ns")
            assert np.shares_memory(r.values, np.frombuffer(data, np.uint8))
            assert r.values.ctypes.data % 8 == np.frombuffer(data, np.uint8).ctypes.data % 8
        # Channels and samples 0: the pack's declared shape.
        declared = encode_frame(w["values"], declared_shape=True)
        assert declared[8:12] == bytes(4)
        assert np.array_equal(frames.decode(memoryview(declared)).values, expected)
        assert np.array_equal(frames.decode(bytearray(declared)).values, expected)


def test_byte_table_of_docs_frames_md() -> None:
    """The layout of docs/frames.md, byte by byte, on one frame."""
    data = encode_frame([[1.5, -2.0]], id="ab", timestamp_ns=1_700_000_000_000_000_001)
    assert data[:4] == b"EAFR"
    assert data[4:8] == bytes([1, 1, 1, 2])
    assert struct.unpack_from("<HHI", data, 8) == (1, 2, 0)
    assert struct.unpack_from("<q", data, 16) == (1_700_000_000_000_000_001,)
    assert data[24:26] == b"ab"
    assert data[26:32] == bytes(6)
    assert struct.unpack_from("<2f", data, 32) == (1.5, -2.0)
    assert len(data) == 40


def test_encode_frame_refuses_what_a_frame_cannot_carry() -> None:
    for values, kw in [
        ([1.0, 2.0], {}),
        (np.zeros((1, 70_000)), {}),
        ([["a"]], {}),
        (OK, {"id": "x" * 256}),
        (OK, {"timestamp_ns": 2**63}),
    ]:
        with pytest.raises(FrameError):
            encode_frame(values, **kw)


def test_decoder_refuses_a_limit_below_one_frame_and_shapes_frames_cannot_carry() -> None:
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        FrameDecoder(SHAPE, 16 + 31)
    FrameDecoder(SHAPE, 16 + 32)
    with pytest.raises(ConfigError, match="channels x samples"):
        FrameDecoder((2, 4, 1), CAP)


# -- every rejection code, exactly once ----------------------------------------------------

VALUES = np.asarray(OK, "<f4").tobytes()

#: Frames for the fake pack (2x4, limit CAP) and the code each must get.
HOSTILE: dict[str, tuple[str, bytes]] = {
    "over the size limit": ("too_large", encode_frame(np.zeros((2, 4)), id="x" * 200) * 20),
    "short header": ("bad_frame", b"EAFR\x01\x01"),
    "empty": ("bad_frame", b""),
    "wrong magic": ("bad_frame", b"EAFX" + encode_frame(OK)[4:]),
    "JSON sent to a frame source": ("bad_frame", json.dumps({"values": OK}).encode()),
    "truncated": ("bad_frame", encode_frame(OK)[:-1]),
    "trailing byte": ("bad_frame", encode_frame(OK) + b"\0"),
    "reserved set": ("bad_frame", header(reserved=1) + VALUES),
    "padding not zero": ("bad_frame", header(id_len=1) + b"a" + b"\x01" * 7 + VALUES),
    "version 2": ("unsupported_frame", header(version=2) + VALUES),
    "dtype 2": ("unsupported_frame", header(dtype=2) + VALUES),
    "unknown flag": ("unsupported_frame", header(flags=2) + VALUES),
    "wrong shape": ("wrong_shape", encode_frame(np.zeros((4, 2)))),
    "half-declared shape": ("wrong_shape", header(channels=0) + VALUES),
    "id not UTF-8": ("invalid_utf8", header(id_len=2) + b"\xff\xfe" + bytes(6) + VALUES),
    "NaN": ("non_finite", encode_frame([[1, np.nan, 0, 0], [0, 0, 0, 0]])),
    "+Infinity": ("non_finite", encode_frame([[1, 0, 0, 0], [0, 0, 0, np.inf]])),
    "-Infinity": ("non_finite", encode_frame([[-np.inf, 0, 0, 0], [0, 0, 0, 0]])),
}


def test_every_code_of_readings_reasons_is_reached_by_a_line_or_a_frame() -> None:
    frame_codes = {code for code, _ in HOSTILE.values()}
    assert set(REJECTION_EXAMPLES) | frame_codes == set(REASONS)
    assert {"bad_frame", "unsupported_frame"} <= frame_codes <= set(REASONS)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_frame_is_rejected_with_its_code_and_counted_once(
    case: str, decoder: FrameDecoder, fake_scorer: Scorer
) -> None:
    code, data = HOSTILE[case]
    with pytest.raises(ReadingError) as err:
        decoder.decode(data)
    assert err.value.code == code, err.value.message
    # As a source hands it on: the rejection, then a good frame, through a fresh pipeline.
    pipeline = ScorePipeline(fake_scorer, CAP)
    out = pipeline.process([decoder.decode_item(data), decoder.decode_item(encode_frame(OK))])
    first, second = (json.loads(x) for x in out.splitlines())
    assert first["error"]["code"] == code
    assert second["label"] == "b"
    assert pipeline.rejects == Counter({code: 1})
    assert pipeline.counts["rejected"] == 1


def test_all_hostile_frames_in_one_run_give_exact_counts(
    decoder: FrameDecoder, fake_scorer: Scorer
) -> None:
    pipeline = ScorePipeline(fake_scorer, CAP)
    items = [decoder.decode_item(data) for _, data in HOSTILE.values()]
    pipeline.process([*items, decoder.decode_item(encode_frame(OK, id="good"))])
    assert pipeline.rejects == Counter(code for code, _ in HOSTILE.values())
    assert pipeline.counts["local"] + pipeline.counts["hard"] == 1


def test_non_finite_at_every_position_and_finite_extremes(decoder: FrameDecoder) -> None:
    """The dot-with-zeros rule: any NaN/Inf anywhere is caught; huge finite values are not."""
    for pos in range(8):
        for bad in (np.nan, np.inf, -np.inf):
            v = np.zeros(8, np.float32)
            v[pos] = bad
            with pytest.raises(ReadingError, match="NaN"):
                decoder.decode(encode_frame(v.reshape(SHAPE)))
    big = np.full(SHAPE, np.finfo(np.float32).max, np.float32)
    big[0, 0] = np.finfo(np.float32).min
    decoder.decode(encode_frame(big))
    decoder.decode(encode_frame(np.full(SHAPE, np.finfo(np.float32).smallest_subnormal)))
    big6 = np.full((6, 100), np.finfo(np.float32).max, np.float32)
    FrameDecoder((6, 100), CAP).decode(encode_frame(big6))  # a float32 sum would overflow


# -- property-based ------------------------------------------------------------------------

float32s = st.floats(width=32, allow_nan=True, allow_infinity=True)


@FAST
@given(st.lists(float32s, min_size=8, max_size=8))
def test_frames_accept_exactly_what_json_accepts(values: list[float]) -> None:
    arr = np.asarray(values, np.float32).reshape(SHAPE)
    try:
        expected: Reading | str = ReadingDecoder(SHAPE).from_values(arr)
    except ReadingError as err:
        expected = err.code
    try:
        got: Reading | str = FrameDecoder(SHAPE, CAP).decode(encode_frame(arr))
    except ReadingError as err:
        got = err.code
    if isinstance(expected, str):
        assert got == expected
    else:
        assert isinstance(got, Reading)
        assert np.array_equal(got.values, expected.values)


def _check(decoder: FrameDecoder, data: bytes | bytearray | memoryview) -> None:
    try:
        r = decoder.decode(data)
    except ReadingError as err:
        code = err.code
    else:
        code = ""
    if code:
        assert code in REASONS
        return
    assert r.values.shape == SHAPE
    assert np.isfinite(r.values).all()


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    decoder = FrameDecoder(SHAPE, 64)
    _check(decoder, data)
    _check(decoder, b"EAFR\x01\x01" + data)
    _check(decoder, memoryview(bytearray(data)))


@FAST
@given(st.data())
def test_damaged_frames_never_crash_the_decoder(data: st.DataObject) -> None:
    good = encode_frame(
        OK,
        id=data.draw(st.text(max_size=9)),
        timestamp_ns=data.draw(st.none() | st.integers(-(2**63), 2**63 - 1)),
    )
    damaged = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good) + 8))
    _check(FrameDecoder(SHAPE, 64 + 16), bytes(damaged[:cut]) + bytes(max(0, cut - len(good))))


# -- byte streams ----------------------------------------------------------------------------


def stream(data: bytes, decoder: FrameDecoder, chunk: int) -> list[Reading | ReadingError]:
    s = FrameStream(decoder)
    out: list[object] = []
    for i in range(0, len(data), chunk):
        out.extend(s.feed(data[i : i + chunk]))
    out.extend(s.end())
    assert all(isinstance(x, (Reading, ReadingError)) for x in out)
    return out  # type: ignore[return-value]


def summary(items: list[Reading | ReadingError]) -> list[object]:
    return [x.id if isinstance(x, Reading) else x.code for x in items]


@pytest.mark.parametrize("chunk", [1, 3, 16, 17, 1000, 1 << 20])
def test_stream_cuts_frames_rejects_and_resynchronises(decoder: FrameDecoder, chunk: int) -> None:
    f = [encode_frame(OK, id=f"f{i}") for i in range(6)]
    data = b"".join(
        [
            f[0],
            encode_frame(np.zeros((4, 2)), id="shape"),  # rejected, skipped exactly
            f[1],
            b"garbage EAF",  # bad header: one rejection, resync at the next magic
            f[2],
            header(version=9) + VALUES,  # unknown version: one rejection, resync
            f[3],
            header(channels=60, samples=60) + bytes(40),  # over the limit: skipped unread
            bytes(60 * 60 * 4 - 40),
            f[4],
            header(flags=1) + struct.pack("<q", 5) + VALUES,
            f[5][:-3],  # the stream ends inside a frame
        ]
    )
    got = summary(stream(data, decoder, chunk))
    assert got == [
        "f0",
        "wrong_shape",
        "f1",
        "bad_frame",
        "f2",
        "unsupported_frame",
        "f3",
        "too_large",
        "f4",
        None,
        "bad_frame",
    ]


def test_stream_of_garbage_is_one_rejection_per_bad_header_and_memory_stays_bounded(
    decoder: FrameDecoder,
) -> None:
    s = FrameStream(decoder)
    out = []
    for _ in range(200):
        out.extend(s.feed(b"\xaa" * 4096))
    assert summary(out) == ["bad_frame"]
    assert len(s._rest) < 16
    assert s.skipped_bytes == 200 * 4096 - 1 - len(s._rest)
    assert s.end() == []


@FAST
@given(
    st.lists(st.binary(max_size=64) | st.sampled_from([encode_frame(OK), header()]), max_size=12),
    st.integers(1, 64),
)
def test_random_streams_never_crash(parts: list[bytes], chunk: int) -> None:
    for item in stream(b"".join(parts), FrameDecoder(SHAPE, 64), chunk):
        if isinstance(item, ReadingError):
            assert item.code in REASONS


def test_fd_groups_reads_frames_from_a_pipe(decoder: FrameDecoder) -> None:
    r, w = os.pipe()
    data = b"".join(encode_frame(OK, id=str(i)) for i in range(50)) + b"EAFR"

    def writer() -> None:
        os.write(w, data)
        os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    items = [x for group in fd_groups(r, 100, decoder) for x in group]
    t.join()
    os.close(r)
    assert summary(items) == [*(str(i) for i in range(50)), "bad_frame"]
    assert list(frame_groups(iter([b""]), decoder)) == [[]]  # an idle tick is an empty group
