"""The MQTT client session every component of ours uses: the link, the cloud worker, the
operator's ``models push`` and the MQTT reading source.

A fresh paho client per attempt (callback API version 2, MQTT v5, clean start) with TLS (CA,
client certificate and key) and a user name whose password is read from a file at connect
time; TCP_NODELAY once connected; reconnects with exponential backoff and full jitter between
``link.reconnect_min_s`` and ``link.reconnect_max_s``, so that devices or workers cut off
together do not all come back in the same instant.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import LinkSettings, Settings, read_secret
from edge_agent.errors import ConfigError
from edge_agent.util.backoff import full_jitter

log = logging.getLogger(__name__)

#: CONNACK reason codes no retry can change: unsupported protocol version, client id not
#: valid, bad user name or password, not authorised, banned, bad authentication method.
PERMANENT_REFUSALS = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})


class Security(Protocol):
    """The TLS and credential keys of a config section that names a broker ([mqtt], [source])."""

    @property
    def tls_ca(self) -> str: ...
    @property
    def tls_cert(self) -> str: ...
    @property
    def tls_key(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def password_file(self) -> str: ...


def new_client(security: Settings | Security, client_id: str) -> mqtt.Client:
    """A paho client (v2 callbacks, MQTT v5) with TLS and credentials: those of ``[mqtt]``
    when given the whole settings, else those of the section given."""
    m = security.mqtt if isinstance(security, Settings) else security
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if m.tls_ca or m.tls_cert:
        try:
            client.tls_set(
                ca_certs=m.tls_ca or None,
                certfile=m.tls_cert or None,
                keyfile=m.tls_key or None,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"mqtt TLS files cannot be used: {exc}") from exc
    if m.username:
        password = read_secret(m.password_file) if m.password_file else None
        client.username_pw_set(m.username, password)
    return client


def backoff_s(link: LinkSettings, attempt: int) -> float:
    """Seconds before reconnect attempt ``attempt + 1``: exponential from ``reconnect_min_s`` up
    to ``reconnect_max_s``, with full jitter."""
    return full_jitter(link.reconnect_min_s, link.reconnect_max_s, attempt)


def set_nodelay(client: mqtt.Client) -> None:
    """Send small packets at once (no Nagle delay): verdicts and PUBACKs are latency-bound."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def disconnect_quietly(client: mqtt.Client) -> None:
    """Close a connection that is lost or no longer wanted; a failure here changes nothing."""
    try:
        client.disconnect()
    except (OSError, ValueError) as exc:
        log.debug("closing a lost connection: %s", exc)


def on_disconnect(
    current: Callable[[], mqtt.Client | None],
    stopping: threading.Event,
    lost: Callable[[str], None],
) -> Callable[[mqtt.Client, Any, Any, ReasonCode, Any], None]:
    """A paho ``on_disconnect`` callback: the connection in use (``current()``) is lost, unless
    it is the owner's own stop closing it."""

    def callback(client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
        if client is current() and not stopping.is_set():
            lost(f"disconnected: {rc}")

    return callback


class Session:
    """The connection attempts of one component (used from its network thread only).

    ``open`` makes a fresh client, lets the caller set its callbacks (and last will), and
    begins the connection; a failed attempt schedules the next one after a backoff. The
    caller reports a lost connection with ``failed`` and a good one with ``connected``.
    """

    def __init__(self, settings: Settings, client_id: str, counters: Counter[str]) -> None:
        self.settings = settings
        self.client_id = client_id
        self.counters = counters
        self.attempt = 0  #: failed attempts since the backoff was last reset
        self.next_at = 0.0  #: monotonic time of the next attempt
        self.last_error = ""  #: why the last attempt failed ("" once connected)
        self.permanent_refusals = 0  #: consecutive refusals no retry can cure

    def due_in(self) -> float:
        """Seconds until the next attempt may be made (<= 0: now)."""
        return self.next_at - time.monotonic()

    def open(
        self, setup: Callable[[mqtt.Client], None], receive_maximum: int = 0
    ) -> mqtt.Client | None:
        """Begin a connection attempt; None when it failed at once (the next is scheduled).
        ``receive_maximum`` (> 0): the QoS 1 messages the broker may send us unacknowledged.

        Raises ConfigError when the TLS files cannot be used (no retry cures that).
        """
        m = self.settings.mqtt
        client = new_client(m, self.client_id)
        setup(client)
        self.counters["connect_attempts"] += 1
        props = None
        if receive_maximum > 0:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.ReceiveMaximum = receive_maximum
        try:
            client.connect(
                m.host, m.port, keepalive=m.keepalive_s, clean_start=True, properties=props
            )
        except (OSError, ValueError) as exc:
            self.failed(f"cannot reach {m.host}:{m.port}: {exc}")
            return None
        return client

    def connected(self, client: mqtt.Client) -> None:
        """The broker accepted the connection."""
        set_nodelay(client)
        self.last_error = ""
        self.permanent_refusals = 0
        self.counters["connects"] += 1

    def refused(self, rc: ReasonCode) -> int:
        """The broker refused the connection (a CONNACK failure): how many times in a row it
        did so for a reason no retry can cure (0 for any other reason)."""
        if rc.value in PERMANENT_REFUSALS:
            self.permanent_refusals += 1
        else:
            self.permanent_refusals = 0
        return self.permanent_refusals

    def reset_backoff(self) -> None:
        self.attempt = 0

    def failed(self, why: str) -> None:
        """An attempt failed or a connection was lost: schedule the next attempt."""
        delay = backoff_s(self.settings.link, self.attempt)
        self.attempt += 1
        self.next_at = time.monotonic() + delay
        if why != self.last_error or self.attempt % 10 == 1:
            log.warning("broker connection failed (%s); retry in %.2f s", why, delay)
        self.last_error = why


class Waker:
    """A self-pipe that wakes a thread sleeping in ``select`` (any thread may ``wake``)."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self.closed = False

    def wake(self) -> None:
        if self.closed:
            return
        # A full pipe means the thread is already due to wake.
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)

    def close(self) -> None:
        """Only once the sleeping thread has ended: a closed descriptor number can be reused
        by any file this process opens next."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)
            os.close(self._w)


def pump(
    client: mqtt.Client | None,
    waker: Waker,
    timeout: float,
    current: Callable[[], bool] = lambda: True,
) -> tuple[str, bool]:
    """Sleep until ``client``'s socket, the waker or the timeout wakes us; run paho's I/O
    (read, write, keepalive pings) while ``current()`` (a callback run by paho may have
    dropped the client). Returns (why the connection is lost or "", whether bytes came
    from the broker)."""
    sock = client.socket() if client is not None else None
    if client is not None and sock is None:
        # paho closed the socket itself (e.g. the broker dropped us during the TLS or MQTT
        # handshake, as with a refused client certificate): nothing would ever wake us.
        return "the connection was closed", False
    rlist: list[Any] = [waker.fd]
    wlist: list[Any] = []
    if client is not None and sock is not None:
        rlist.append(sock)
        if client.want_write():
            wlist.append(sock)
    try:
        readable, writable, _ = select.select(rlist, wlist, [], timeout)
    except (OSError, ValueError) as exc:  # the socket was closed under us
        return (f"socket error: {exc}" if client is not None else ""), False
    if waker.fd in readable:
        waker.drain()
    if client is None or sock is None:
        return "", False
    came_in = False
    for ready, step in ((readable, client.loop_read), (writable, client.loop_write)):
        if sock in ready and current():
            rc = step()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return f"network: {mqtt.error_string(rc)}", came_in
            came_in = came_in or step == client.loop_read
    if current():
        rc = client.loop_misc()  # keepalive pings and their timeouts
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return f"network: {mqtt.error_string(rc)}", came_in
    return "", came_in
