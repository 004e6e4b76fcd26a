"""The agent's PUBLISH properties encoder (mqtt/properties.py) against paho's own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.mqtt.properties import publish_properties

_text = st.text(min_size=0, max_size=300).filter(lambda s: "\x00" not in s)


@given(
    user=st.lists(st.tuples(_text, _text), min_size=1, max_size=3),
    expiry=st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)),
    topic=st.one_of(st.none(), _text.filter(bool)),
    correlation=st.one_of(st.none(), st.binary(min_size=1, max_size=300)),
)
def test_the_bytes_are_paho_s(
    user: list[tuple[str, str]], expiry: int | None, topic: str | None, correlation: bytes | None
) -> None:
    """Every combination the link sends (user properties, expiry, response topic and
    correlation data), long enough for a two-byte length prefix: the same bytes as paho."""
    want = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    want.UserProperty = user
    if expiry is not None:
        want.MessageExpiryInterval = expiry
    if topic is not None:
        want.ResponseTopic = topic
    if correlation is not None:
        want.CorrelationData = correlation
    got = publish_properties(user, expiry, topic, correlation)
    assert isinstance(got, Properties)
    assert got.pack() == want.pack()
    assert got.pack().hex() in str(got)


def test_a_field_over_65535_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="at most 65535 bytes"):
        publish_properties([("k", "v" * 65536)])
