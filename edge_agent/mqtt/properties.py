"""PUBLISH properties encoded here, once per message.

paho-mqtt encodes a ``Properties`` object in Python, attribute by attribute, with checks: about
50 us for an idempotency key and an expiry interval (AMD EPYC), on the link thread, which
shares the interpreter with scoring. The few properties the agent sends are encoded here in a
few microseconds, with the same bytes as paho's encoder (a test compares them), and handed to
paho as a ``Properties`` whose ``pack`` returns them.
"""

from __future__ import annotations

import struct

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# MQTT 5.0 property identifiers (section 2.2.2.2), in the order paho writes them.
_EXPIRY = b"\x02"
_RESPONSE_TOPIC = b"\x08"
_CORRELATION = b"\x09"
_USER = b"\x26"
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _varint(n: int) -> bytes:
    """MQTT's variable byte integer (1 to 4 bytes, 7 bits each, least significant first)."""
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def _field(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"an MQTT property field is at most 65535 bytes, not {len(data)}")
    return _U16.pack(len(data)) + data


class PackedProperties(Properties):
    """PUBLISH properties whose encoding is given (``publish_properties``). paho only packs
    the properties of a PUBLISH (and prints them in its debug log); the base class's
    per-instance tables (~12 us to build) are not made."""

    def __init__(self, packed: bytes) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", packed)

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed

    def __str__(self) -> str:
        return f"[packed {self.pack().hex()}]"

    __repr__ = __str__


def publish_properties(
    user: list[tuple[str, str]],
    expiry_s: int | None = None,
    response_topic: str | None = None,
    correlation: bytes | None = None,
) -> PackedProperties:
    """The properties of one PUBLISH: user properties, message expiry interval (s), response
    topic and correlation data, each only when given."""
    body = b""
    if expiry_s is not None:
        body += _EXPIRY + _U32.pack(expiry_s)
    if response_topic is not None:
        body += _RESPONSE_TOPIC + _field(response_topic.encode())
    if correlation is not None:
        body += _CORRELATION + _field(correlation)
    for name, value in user:
        body += _USER + _field(name.encode()) + _field(value.encode())
    return PackedProperties(_varint(len(body)) + body)
