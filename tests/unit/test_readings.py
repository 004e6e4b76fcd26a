from __future__ import annotations

import json

import numpy as np
import pytest

from edge_agent.errors import ReadingError
from edge_agent.ingest.readings import REASONS, ReadingDecoder

SHAPE = (2, 3)


def line(values: object, **extra: object) -> bytes:
    return json.dumps({"values": values, **extra}).encode()


@pytest.fixture
def decoder() -> ReadingDecoder:
    return ReadingDecoder(SHAPE, max_line_bytes=1024)


def test_valid_reading(decoder: ReadingDecoder) -> None:
    r = decoder.decode(line([[1, 2, 3], [4.5, 5, 6]], id="r1", label="ignored"))
    assert r.id == "r1"
    assert r.values.dtype == np.float32
    assert r.values.shape == SHAPE
    assert r.values[1, 0] == pytest.approx(4.5)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"x" * 2000, "too_large"),
        (b'{"values": [[1,2,3],[4,5,"\xff"]]}', "invalid_utf8"),
        (b'{"values": [[1,2,3],[4,5,6]]', "malformed_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"id": 3}', "missing_values"),
        (b'{"values": [[1,2,3],[4,5,"6"]]}', "wrong_type"),
        (b'{"values": [[1,2,3],[4,5,true]]}', "wrong_type"),
        (b'{"values": "abc"}', "wrong_type"),
        (b'{"values": [1,2,3,4,5,6]}', "wrong_shape"),
        (b'{"values": [[1,2,3],[4,5]]}', "wrong_shape"),
        (b'{"values": [[1,2,3]]}', "wrong_shape"),
        (b'{"values": [[1,2,3],[4,5,NaN]]}', "non_finite"),
        (b'{"values": [[1,2,3],[4,5,Infinity]]}', "non_finite"),
        (b'{"values": [[1,2,3],[4,5,1e999]]}', "non_finite"),
        (b'{"values": [[1,2,3],[4,5,1e39]]}', "non_finite"),
    ],
)
def test_each_defect_has_its_reason(decoder: ReadingDecoder, raw: bytes, code: str) -> None:
    assert code in REASONS
    with pytest.raises(ReadingError) as err:
        decoder.decode(raw)
    assert err.value.code == code
    assert err.value.message


def test_deep_nesting_is_refused_not_a_crash() -> None:
    deep = b'{"id":' + b"[" * 5000 + b"]" * 5000 + b', "values": [[1,2,3],[4,5,6]]}'
    with pytest.raises(ReadingError) as err:
        ReadingDecoder(SHAPE, max_line_bytes=1 << 20).decode(deep)
    assert err.value.code == "too_deep"


def test_id_of_a_rejected_line_is_recovered(decoder: ReadingDecoder) -> None:
    raw = b'{"id": "abc", "values": [[1]]}'
    with pytest.raises(ReadingError):
        decoder.decode(raw)
    assert decoder.reject_id(raw) == "abc"
    assert decoder.reject_id(b"not json") is None
    assert decoder.reject_id(b"x" * 5000) is None
