"""Hostile input, property-based: every decoder answers with a clear, counted error or a valid
result, and never with any other exception.

Decoders under test: device input (``ReadingDecoder.decode``), the cloud worker's handling of a
raw MQTT message (``CloudWorker._on_message``, with the fake pack), the device's verdict
decoding (``Reconciler.on_verdict``) and config files (``load_settings``). Inputs: arbitrary
bytes, JSON of any shape, malformed and deeply nested JSON, huge lines, NaN/Infinity, wrong
shapes and types, invalid UTF-8, duplicate keys.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.cloud.intake import decode_batch
from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import Settings, load_settings
from edge_agent.errors import ConfigError, ReadingError
from edge_agent.ingest import readings
from edge_agent.ingest.readings import REASONS, Reading, ReadingDecoder
from edge_agent.models.pack import open_pack
from edge_agent.routing.router import Reconciler
from edge_agent.scoring.pipeline import ScorePipeline
from edge_agent.scoring.scorer import Scorer
from edge_agent.wire.messages import (
    SCHEMA_VERSION,
    HardCase,
    LocalDecision,
    Tier,
    Topics,
    Verdict,
    decode_verdicts,
    encoder,
)
from tests.conftest import make_fake_pack

SHAPE = (2, 4)  # the fake pack's input shape
MAX_LINE = 64 * 1024
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies --------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.text(max_size=8), inner, max_size=6),
    ),
    max_leaves=40,
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([3.5e38, -3.5e38, 1e308, 5e-324, -0.0]),
)
#: Nearly right ``values``: the right or a wrong shape, numbers or anything in the cells.
cells = st.one_of(numbers, numbers, numbers, scalars, json_values)
values_like = st.one_of(
    st.lists(st.lists(numbers, min_size=4, max_size=4), min_size=2, max_size=2),
    st.lists(st.lists(cells, min_size=0, max_size=6), min_size=0, max_size=4),
    cells,
)


def dumps(obj: Any) -> bytes:
    """JSON as a careless or hostile sender writes it: NaN/Infinity tokens allowed."""
    return json.dumps(obj, allow_nan=True).encode()


@st.composite
def hostile_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """Damage a valid message: truncate, splice bytes, nest deeply, duplicate keys, pad."""
    kind = draw(st.sampled_from(["truncate", "splice", "deep", "dup", "pad", "raw", "nan"]))
    if kind == "truncate":
        return valid[: draw(st.integers(0, max(0, len(valid) - 1)))]
    if kind == "splice":
        at = draw(st.integers(0, len(valid)))
        junk = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\xff", b"\xc3\x28"]))
        return valid[:at] + junk + valid[at:]
    if kind == "deep":
        depth = draw(st.integers(100, 100_000))
        opener = draw(st.sampled_from([b"[", b'{"a":']))
        closer = b"]" if opener == b"[" else b"}"
        nested = opener * depth + b"1" + closer * depth
        return valid[:-1] + b',"id":' + nested + b"}" if valid.endswith(b"}") else nested
    if kind == "dup":
        key = draw(st.sampled_from([b"values", b"key", b"device", b"v", b"tier", b"verdicts"]))
        return valid[:-1] + b',"' + key + b'":' + dumps(draw(json_values)) + b"}"
    if kind == "pad":
        return valid + b" " * draw(st.integers(0, 200_000))
    if kind == "nan":
        return valid.replace(b"1.0", draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"])))
    return draw(st.binary(max_size=300))


# -- device input ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder() -> ReadingDecoder:
    return ReadingDecoder(SHAPE, max_line_bytes=MAX_LINE)


VALID_LINE = dumps({"id": "r1", "values": [[1.0, 0.5, 0, 0], [0, 0, 0, 0]]})


def _strict() -> ReadingDecoder:
    """The decoder without its orjson path (msgspec, typed)."""
    strict = ReadingDecoder(SHAPE, max_line_bytes=MAX_LINE)
    strict._fast = False
    return strict


STRICT = _strict()


def _outcome(decoder: ReadingDecoder, line: bytes) -> Any:
    try:
        return decoder.decode(line)
    except ReadingError as exc:
        return exc


def check_reading(decoder: ReadingDecoder, line: bytes) -> None:
    """No crash, a stable code or a valid reading; and the same outcome, to the bit, as the
    strict path alone (the orjson path may only take lines the strict path takes)."""
    got, want = _outcome(decoder, line), _outcome(STRICT, line)
    if isinstance(got, ReadingError):
        assert got.code in REASONS, got.code
        assert got.message
        decoder.reject_id(line)  # echoing the id of a rejected line never raises either
        assert isinstance(want, ReadingError)
        assert got.code == want.code
        return
    assert isinstance(want, Reading), (line[:80], want)
    assert got.values.shape == SHAPE
    assert got.values.dtype == np.float32
    assert np.isfinite(got.values).all()
    assert got.values.tobytes() == want.values.tobytes()
    assert got.id == want.id
    assert type(got.id) is type(want.id)


@FAST
@given(line=st.binary(max_size=2000))
def test_reading_decoder_on_arbitrary_bytes(decoder: ReadingDecoder, line: bytes) -> None:
    check_reading(decoder, line)


@FAST
@given(obj=json_values)
def test_reading_decoder_on_any_json(decoder: ReadingDecoder, obj: Any) -> None:
    check_reading(decoder, dumps(obj))


@FAST
@given(values=values_like, rid=json_values, extra=st.dictionaries(st.text(max_size=5), scalars))
def test_reading_decoder_on_nearly_right_readings(
    decoder: ReadingDecoder, values: Any, rid: Any, extra: dict[str, Any]
) -> None:
    check_reading(decoder, dumps({**extra, "id": rid, "values": values}))


@FAST
@given(line=hostile_bytes(VALID_LINE))
def test_reading_decoder_on_damaged_readings(decoder: ReadingDecoder, line: bytes) -> None:
    check_reading(decoder, line)


def test_reading_decoder_fixed_hostile_cases(decoder: ReadingDecoder) -> None:
    cases = {
        b"x" * (MAX_LINE + 1): "too_large",
        b"[" * 50_000: None,  # malformed or too deep: either is a clear code
        b'{"values":' + b"[" * 10_000 + b"]" * 10_000 + b"}": None,
        b'{"values": [[NaN, 1, 2, 3], [0, 0, 0, 0]]}': "non_finite",
        b'{"values": [[1e39, 1, 2, 3], [0, 0, 0, 0]]}': "non_finite",
        b'{"values": [[1, 1, 2, 3], [0, 0, 0, 0]], "values": 7}': "wrong_shape",
        b'{"values": [[1, 1, 2, 3], [0, 0, 0, "\xff"]]}': "invalid_utf8",
        b'{"values": [[1, 1, 2, 3], [0, 0, 0, 0]]}\x00': "malformed_json",
    }
    for line, code in cases.items():
        with pytest.raises(ReadingError) as err:
            decoder.decode(line)
        assert err.value.code in REASONS
        if code is not None:
            assert err.value.code == code, (line[:60], err.value.code)
    # Duplicate keys: every occurrence is validated (msgspec) and the last one wins.
    with pytest.raises(ReadingError):
        decoder.decode(b'{"values": 7, "values": [[2, 1, 2, 3], [0, 0, 0, 0]]}')
    r = decoder.decode(
        b'{"values": [[9, 1, 2, 3], [0, 0, 0, 0]], "values": [[2, 1, 2, 3], [0, 0, 0, 0]]}'
    )
    assert r.values[0, 0] == 2


#: One line per rejection code of ``readings.REASONS`` (the fake pack's shape is 2x4).
REJECTION_EXAMPLES: dict[str, bytes] = {
    "too_large": b"x" * (MAX_LINE + 1),
    "invalid_utf8": b'{"values": [[1, 1, 2, 3], [0, 0, 0, "\xff"]]}',
    "malformed_json": b'{"values": [[1, 1, 2, 3], [0, 0, 0, 0]]',
    "too_deep": b'{"values": [[1, 1, 2, 3], [0, 0, 0, 0]], "id": '
    + b"[" * 20_000
    + b"]" * 20_000
    + b"}",
    "not_an_object": b"[1, 2]",
    "missing_values": b'{"id": 1}',
    "wrong_type": b'{"values": [[1, 1, 2, "a"], [0, 0, 0, 0]]}',
    "wrong_shape": b'{"values": [[1, 1, 2], [0, 0, 0]]}',
    "non_finite": b'{"values": [[NaN, 1, 2, 3], [0, 0, 0, 0]]}',
}


def test_every_rejection_code_has_an_example() -> None:
    # The codes only binary frames can get are reached in unit/test_frames.py.
    assert set(REJECTION_EXAMPLES) == set(REASONS) - {"bad_frame", "unsupported_frame"}


@pytest.mark.parametrize("code", sorted(REJECTION_EXAMPLES))
def test_reading_rejection_code_is_given_and_counted_exactly_once(
    code: str, fake_scorer: Scorer
) -> None:
    """Each code of ``readings.REASONS`` is reached by its example, on a fresh decoder and a
    fresh scoring pipeline: the line gets its error line and one count, nothing else."""
    line = REJECTION_EXAMPLES[code]
    with pytest.raises(ReadingError) as err:
        ReadingDecoder(SHAPE, max_line_bytes=MAX_LINE).decode(line)
    assert err.value.code == code
    pipeline = ScorePipeline(fake_scorer, MAX_LINE)
    out = pipeline.process([line, VALID_LINE])
    first, second = out.splitlines()
    assert json.loads(first)["error"]["code"] == code
    assert json.loads(second)["label"] == "b"  # the next line is scored as usual
    assert pipeline.rejects == Counter({code: 1})
    assert (pipeline.counts["rejected"], pipeline.counts["local"] + pipeline.counts["hard"]) == (
        1,
        1,
    )


def test_lines_one_at_a_time_unread_are_as_a_group(fake_scorer: Scorer) -> None:
    """``edge-agent run`` without ``--decisions`` hands the pipeline one line at a time and
    reads no output (the lone-line path): the decisions its hook sees (label, confidence,
    route, reason, id, sequence number), the counts and the rejections by code are those of
    the same lines scored as one group with their output read."""
    examples = list(REJECTION_EXAMPLES.values())
    lines = [x for pair in zip([VALID_LINE] * len(examples), examples, strict=True) for x in pair]
    seen: dict[str, list[tuple[Any, ...]]] = {"alone": [], "group": []}

    def hook(name: str) -> Any:
        def record(d: Any) -> None:
            seen[name].append(
                (d.label, d.confidence, d.route, d.reason, d.reading.id, d.reading.seq)
            )

        return record

    def numbers() -> Any:  # sequence numbers as the outbox gives them
        count = itertools.count(1)
        return lambda n: [next(count) for _ in range(n)]

    alone = ScorePipeline(
        fake_scorer, MAX_LINE, on_decision=hook("alone"), next_seqs=numbers(), output=False
    )
    for line in lines:
        assert alone.process([line]) == b""
    group = ScorePipeline(fake_scorer, MAX_LINE, on_decision=hook("group"), next_seqs=numbers())
    out = group.process(lines)
    assert len(out.splitlines()) == len(lines)
    assert seen["alone"] == seen["group"]
    assert len(seen["alone"]) == len(examples)
    assert alone.counts == group.counts
    assert alone.rejects == group.rejects == Counter(REJECTION_EXAMPLES.keys())


# -- the cloud worker --------------------------------------------------------------------


@dataclass
class _Info:
    mid: int
    rc: int = mqtt.MQTT_ERR_SUCCESS


class _Client:
    """Stands in for paho's client: records what the worker publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, properties: Any = None) -> _Info:
        self.published.append((topic, payload))
        return _Info(len(self.published))


@pytest.fixture(scope="module")
def fake_scorer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scorer]:
    scorer = Scorer.open(open_pack(make_fake_pack(tmp_path_factory.mktemp("pack") / "fake-pack")))
    yield scorer
    scorer.close()


WORKER_ENV = {"EDGE_AGENT_MQTT_TOPIC_PREFIX": "edge", "EDGE_AGENT_CLOUD_MAX_PAYLOAD_BYTES": "65536"}


def fresh_worker(scorer: Scorer) -> tuple[CloudWorker, _Client]:
    """A worker of its own for one example (counters from zero, empty dedupe memory)."""
    w = CloudWorker(load_settings(None, env=WORKER_ENV), scorer=scorer)
    # What start() sets up, without a network thread: messages are handed in directly.
    w._readings = ReadingDecoder(scorer.shape)
    return w, _Client()


def urgent_case(seq: int = 1, device: str = "dev-1") -> bytes:
    return encoder.encode(
        HardCase(
            v=SCHEMA_VERSION,
            key=f"{device}:{seq}",
            device=device,
            seq=seq,
            values=[[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
            local=LocalDecision("a", 0.4, "low_confidence", "m@1"),
            tier=Tier.URGENT,
        )
    )


def batch_of(cases: list[bytes], device: str = "dev-1") -> bytes:
    return b'{"v":1,"device":"%s","cases":[%s]}' % (device.encode(), b",".join(cases))


def deliver(
    w: CloudWorker, client: _Client, topic: str, payload: bytes, response_topic: Any = None
) -> None:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
        props.CorrelationData = b"c"
    msg.properties = props
    w._on_message(client, None, msg)  # type: ignore[arg-type]
    assert w.counters["errors"] == 0, "a message reached the worker's last line of defence"


def outcomes(w: CloudWorker) -> Counter[str]:
    """What became of the cases a worker was handed: refused (by reason), scored, or
    answered from memory."""
    return Counter(
        {
            k: v
            for k, v in w.counters.items()
            if k.startswith("rejected_")
            or k in ("urgent_scored", "batch_cases_scored", "duplicates")
        }
    )


def deliver_once(
    scorer: Scorer, topic: str, payload: bytes, response_topic: Any = None
) -> CloudWorker:
    """One message to a fresh worker, accounted for exactly: a hard case (or anything on
    another topic) is refused once or scored once; a batch is refused whole once, or each
    of its cases is refused, scored or answered from memory once."""
    w, client = fresh_worker(scorer)
    deliver(w, client, topic, payload, response_topic)
    got = outcomes(w)
    if w.counters["batches"]:
        # How many cases the worker took the batch to hold (invalid UTF-8 inside one case
        # refuses that case only, so a strict JSON parser is no judge of that number).
        cases = decode_batch(payload, Topics.device_of(topic)).cases
        assert sum(got.values()) == len(cases), (dict(w.counters), len(cases))
        return w
    assert sum(got.values()) == 1, dict(w.counters)
    if got["urgent_scored"]:
        assert w.counters["verdicts_sent"] == len(client.published) == 1
    else:
        assert client.published == []  # a refused case is never answered
    return w


CLOUD_TOPICS = st.sampled_from(
    ["edge/dev-1/hard", "edge/dev-1/batch", "edge/dev-2/hard", "edge/dev-1/other", "edge/+/hard"]
)


@FAST
@given(topic=CLOUD_TOPICS, payload=st.binary(max_size=2000))
def test_cloud_worker_on_arbitrary_bytes(fake_scorer: Scorer, topic: str, payload: bytes) -> None:
    deliver_once(fake_scorer, topic, payload)


@FAST
@given(topic=CLOUD_TOPICS, obj=json_values)
def test_cloud_worker_on_any_json(fake_scorer: Scorer, topic: str, obj: Any) -> None:
    deliver_once(fake_scorer, topic, dumps(obj))


@FAST
@given(
    seq=st.integers(0, 10**6),
    field=st.sampled_from(["v", "key", "device", "seq", "values", "local", "tier", "id"]),
    value=json_values,
    as_batch=st.booleans(),
)
def test_cloud_worker_on_cases_with_one_wrong_field(
    fake_scorer: Scorer, seq: int, field: str, value: Any, as_batch: bool
) -> None:
    case = json.loads(urgent_case(seq))
    case[field] = value
    body = dumps(case)
    if as_batch:
        deliver_once(fake_scorer, "edge/dev-1/batch", batch_of([urgent_case(seq + 1), body]))
    else:
        deliver_once(fake_scorer, "edge/dev-1/hard", body, response_topic="edge/dev-1/verdict")


@FAST
@given(
    payload=hostile_bytes(urgent_case(7)),
    response_topic=st.one_of(
        st.none(),
        st.sampled_from(["edge/dev-1/verdict", "edge/dev-2/verdict", "edge/dev-1/verdict/#"]),
        st.text(max_size=40),
    ),
)
def test_cloud_worker_on_damaged_cases(
    fake_scorer: Scorer, payload: bytes, response_topic: str | None
) -> None:
    deliver_once(fake_scorer, "edge/dev-1/hard", payload, response_topic=response_topic)


@FAST
@given(payload=hostile_bytes(batch_of([urgent_case(1), urgent_case(2)])))
def test_cloud_worker_on_damaged_batches(fake_scorer: Scorer, payload: bytes) -> None:
    deliver_once(fake_scorer, "edge/dev-1/batch", payload)


def test_cloud_worker_only_answers_on_the_senders_own_verdict_topic(fake_scorer: Scorer) -> None:
    w, client = fresh_worker(fake_scorer)
    deliver(w, client, "edge/dev-1/hard", urgent_case(99), response_topic="edge/dev-2/verdict")
    deliver(w, client, "edge/dev-1/hard", urgent_case(98, "dev-2"))
    deliver(w, client, "edge/dev-1/hard", urgent_case(97), response_topic="edge/dev-1/verdict/x")
    assert [t for t, _ in client.published] == ["edge/dev-1/verdict/x"]
    assert outcomes(w) == Counter(
        {"rejected_response_topic": 1, "rejected_device_mismatch": 1, "urgent_scored": 1}
    )


# -- verdicts reaching the device --------------------------------------------------------


def verdict(key: str = "dev1:1") -> bytes:
    return encoder.encode(
        Verdict(
            v=SCHEMA_VERSION,
            key=key,
            device="dev1",
            seq=1,
            label="a",
            confidence=0.9,
            model="m@1",
            tier=Tier.URGENT,
        )
    )


def fresh_reconciler(expecting: str | None = None) -> Reconciler:
    """A reconciler of its own (counters from zero), awaiting one urgent case if asked."""
    r = Reconciler(Settings().router)
    if expecting is not None:
        r.expect(expecting, "a", Tier.URGENT)
    return r


MALFORMED_VERDICTS = [
    b"",
    b"{",
    b"null",
    b"[]",
    b"\xff\xfe",
    b'{"v":1}',
    verdict()[:-1],
    verdict().replace(b'"confidence":0.9', b'"confidence":NaN'),
    verdict().replace(b'"confidence":0.9', b'"confidence":"high"'),
    b'{"v":1,"device":"dev1","verdicts":[{"key":1}]}',
]


@pytest.mark.parametrize("payload", MALFORMED_VERDICTS)
def test_reconciler_counts_each_malformed_verdict_once_and_keeps_waiting(payload: bytes) -> None:
    r = fresh_reconciler(expecting="dev1:1")
    r.on_verdict(payload)
    assert r.counters == Counter({"verdicts_malformed": 1})
    assert r.waiting_urgent() == 1  # the case still awaits its verdict


def test_reconciler_takes_a_well_formed_verdict() -> None:
    """The counterpart of the malformed ones: the same reconciler takes a good verdict."""
    r = fresh_reconciler(expecting="dev1:1")
    r.on_verdict(verdict())
    assert r.counters == Counter({"verdicts_urgent": 1, "verdicts_on_time": 1, "agree": 1})
    assert r.waiting_urgent() == 0


@FAST
@given(payload=st.one_of(st.binary(max_size=2000), json_values.map(dumps)))
def test_reconciler_on_arbitrary_payloads(payload: bytes) -> None:
    """Nothing is expected, so a payload is either malformed (counted once) or verdicts
    for unknown cases (each counted once)."""
    r = fresh_reconciler()
    r.on_verdict(payload)
    c = r.counters
    if c["verdicts_malformed"]:
        assert c == Counter({"verdicts_malformed": 1}), dict(c)
    else:
        assert c == Counter({"verdicts_unknown": len(decode_verdicts(payload))}), dict(c)


@FAST
@given(
    payload=st.one_of(
        hostile_bytes(verdict()),
        hostile_bytes(b'{"v":1,"device":"dev1","verdicts":[%s]}' % verdict()),
    )
)
def test_reconciler_on_damaged_verdicts(payload: bytes) -> None:
    r = fresh_reconciler(expecting="dev1:1")
    r.on_verdict(payload)  # never raises
    c = r.counters
    if c["verdicts_malformed"]:
        assert c == Counter({"verdicts_malformed": 1}), dict(c)
        assert r.waiting_urgent() == 1
    else:  # decoded: each verdict in it was taken once (ours, another case's, "no verdict")
        taken = c["verdicts_urgent"] + c["verdicts_unknown"] + c["no_verdict"]
        assert taken == len(decode_verdicts(payload)), dict(c)


# -- config files ------------------------------------------------------------------------

SECTIONS = ["device", "model", "input", "source", "mqtt", "outbox", "link", "router", "cloud"]
KEYS = [
    "id", "state_dir", "pack", "max_batch", "max_line_bytes", "kind", "port", "host",
    "keepalive_s", "hard_sync", "urgent_ttl_s", "inflight_window", "urgent_below",
    "urgent_reasons", "dedupe_keys", "price_sync_per_1k_tokens", "password", "unknown",
]  # fmt: skip
toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: (
            "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf") if math.isinf(f) else repr(f)
        )
    ),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=20).map(json.dumps),
    st.sampled_from(["1979-05-27T07:32:00Z", "07:32:00", "[1, 2]", "{a = 1}", '"""x"""']),
)


@st.composite
def toml_documents(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"[{draw(st.sampled_from([*SECTIONS, 'bogus', 'mqtt.tls']))}]")
        for _ in range(draw(st.integers(0, 4))):
            lines.append(f"{draw(st.sampled_from(KEYS))} = {draw(toml_scalars)}")
    text = "\n".join(lines).encode()
    damage = draw(st.sampled_from(["none", "none", "splice", "deep", "dup", "binary"]))
    if damage == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=6)) + text[at:]
    elif damage == "deep":
        depth = draw(st.integers(10, 50_000))
        text += b"\n[device]\nid = " + b"[" * depth + b"]" * depth
    elif damage == "dup":
        text += b"\n[mqtt]\nport = 1\n[mqtt]\nport = 2\n"
    elif damage == "binary":
        text = draw(st.binary(max_size=300))
    return text


@FAST
@given(doc=toml_documents())
def test_load_settings_on_arbitrary_toml(
    tmp_path_factory: pytest.TempPathFactory, doc: bytes
) -> None:
    path = Path(tmp_path_factory.getbasetemp()) / "hostile.toml"
    path.write_bytes(doc)
    error: ConfigError | None = None
    try:
        s = load_settings(path, env={})
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert str(path) in str(error)
        return
    for section in SECTIONS:  # every float a setting holds is finite
        for value in msgspec_fields(getattr(s, section)):
            assert not isinstance(value, float) or math.isfinite(value)


def msgspec_fields(obj: Any) -> list[Any]:
    return [getattr(obj, f) for f in obj.__struct_fields__]


@pytest.mark.parametrize(
    "doc",
    [
        b'[device]\nid = "\xff"\n',
        b"[device]\nid = " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        b"[outbox]\nurgent_ttl_s = inf\n",
        b"[link]\nreconnect_max_s = inf\n",
        b"[cloud]\nprice_sync_per_1k_tokens = inf\n",
        b"[router]\nurgent_below = nan\n",
    ],
)
def test_load_settings_fixed_hostile_cases(tmp_path: Path, doc: bytes) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(doc)
    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path, env={})


def test_non_finite_environment_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="EDGE_AGENT_"):
        load_settings(None, env={"EDGE_AGENT_LINK_RECONNECT_MAX_S": "inf"})


def test_the_orjson_path_takes_only_what_the_strict_path_takes() -> None:
    """Lines numpy alone would turn into numbers, or that orjson reads otherwise than the
    strict path: each gets the strict path's answer (``check_reading`` compares)."""
    decoder = ReadingDecoder(SHAPE, max_line_bytes=MAX_LINE)
    for line in (
        b'{"values": [[true, 0.5, 0, 0], [0, 0, 0, 0]]}',
        b'{"values": [["1.5", 0.5, 0, 0], [0, 0, 0, 0]]}',
        b'{"values": [[null, 0.5, 0, 0], [0, 0, 0, 0]]}',
        b'{"values": 7, "values": [[2, 1, 2, 3], [0, 0, 0, 0]]}',
        b'{"values": 7, "\\u0076alues": [[2, 1, 2, 3], [0, 0, 0, 0]]}',
        b'{"values": [[1e39, 1, 2, 3], [0, 0, 0, 0]]}',
        b'{"values": [[1, 2, 3, 4], [5, 6, 7, 8]], "id": 18446744073709551616}',
        b'{"values": [[1, 2, 3, 4], [5, 6, 7, 8]], "id": {"a": [1, 2.5, "x"]}}',
        b'{"values": [[1, 2, 3, 4], [5, 6, 7, 8]], "id": "r"}',
    ):
        check_reading(decoder, line)
    # The common case does take the orjson path when orjson is installed.
    line = b'{"values": [[1, 2, 3, 4], [5, 6, 7, 8.5]], "id": "r"}'
    assert (decoder._decode_fast(line) is not None) == (readings._orjson_loads is not None)
