"""A TCP proxy that gives a loopback connection a real network's delay, jitter and loss.

``edge-agent bench`` and ``edge-agent demo`` run the broker on 127.0.0.1, where a round trip
costs a fraction of a millisecond. ``NetProxy`` sits between the device (the agent, the
benchmark's client) and the broker and makes the device's connection behave like one over a
wired link, LTE or a geostationary satellite (``PROFILES``). ``tc netem`` would do this in the
kernel, but it is not available on every machine this runs on (it is not in the development
VM's kernel); a user-space proxy works anywhere and is started and stopped with the tool.

The model, per direction of each proxied connection (``NetworkProfile``):

* **delay** — every chunk of bytes read from one side is written to the other side
  ``rtt_ms / 2`` after it was read (one way), so a request and its answer pay ``rtt_ms``.
* **jitter** — each chunk's one-way delay gets an extra ``U(-jitter_ms/2, +jitter_ms/2)``
  (uniform, never below zero), so a round trip varies by up to ``±jitter_ms``. TCP delivers
  bytes in order, so a chunk is never written before the one read before it: when a chunk
  draws a shorter delay than its predecessor it waits for it (head-of-line blocking, as on a
  real connection). Jitter therefore never reorders bytes of a connection.
* **loss** — a TCP stream cannot drop bytes: a lost segment is sent again, and what the
  application sees is the delay of that recovery. A chunk of ``n`` bytes counts as
  ``ceil(n / MSS)`` segments (MSS 1448 bytes, Ethernet with TCP timestamps), each lost with
  probability ``loss``; a chunk with a lost segment is delayed by one retransmission timeout,
  RTO = max(200 ms, rtt + 4 x jitter): RFC 6298's SRTT + 4·RTTVAR with Linux's floor
  ``TCP_RTO_MIN`` of 200 ms. The resent copy can be lost again (same probability); each further
  loss doubles the RTO (RFC 6298's back-off) up to Linux's ``TCP_RTO_MAX`` of 120 s. Timeout
  recovery, not fast retransmit, is the right model here: fast retransmit needs three
  duplicate ACKs, i.e. three later segments in flight, and MQTT's request/answer traffic
  rarely has them (Linux's tail-loss probe would recover a little sooner, after about two
  round trips: the model errs on the slow side).
  Loss holds up the bytes after the lost chunk too (head-of-line), never corrupts or drops any.

Limits: no bandwidth cap (a 6 KB hard case takes ~5 ms on a 10 Mbit/s uplink, not modelled),
no queueing in the network, the TCP and MQTT handshakes pay the delay like any other bytes
(the accept itself is local). Each connection uses four threads (a reader and a writer per
direction) that block on their sockets or a condition: no busy loop. ``stop()`` closes the
listener and every connection and joins the threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from edge_agent.errors import ConfigError

__all__ = ["PROFILES", "NetProxy", "NetworkProfile", "profile"]

log = logging.getLogger(__name__)

#: Bytes of payload per TCP segment on Ethernet (1500 MTU - 40 IP/TCP - 12 timestamps).
MSS = 1448
#: Linux's smallest retransmission timeout (``TCP_RTO_MIN``, HZ/5 in include/net/tcp.h).
RTO_MIN_MS = 200.0
#: Linux's largest retransmission timeout (``TCP_RTO_MAX``, 120 s): the back-off stops there.
RTO_MAX_MS = 120_000.0
#: Bytes read from a socket at a time.
CHUNK = 65536


@dataclass(frozen=True)
class NetworkProfile:
    """A network between device and broker: round trip, its jitter and segment loss."""

    name: str
    rtt_ms: float  #: round trip time, half each way
    jitter_ms: float = 0.0  #: a round trip varies by up to ± this (uniform per chunk and way)
    loss: float = 0.0  #: probability that one TCP segment is lost (and must be resent)
    note: str = ""  #: where the figures come from

    @property
    def rto_ms(self) -> float:
        """The retransmission timeout a lost segment costs (RFC 6298, Linux's floor)."""
        return max(RTO_MIN_MS, self.rtt_ms + 4.0 * self.jitter_ms)

    def describe(self) -> str:
        parts = [f"{self.rtt_ms:g} ms RTT"]
        if self.jitter_ms:
            parts.append(f"± {self.jitter_ms:g} ms")
        if self.loss:
            parts.append(f"{100 * self.loss:g}% loss")
        return " ".join(parts)


#: The profiles by name. The figures are public typical values (docs/BENCHMARKS.md says more).
PROFILES: dict[str, NetworkProfile] = {
    p.name: p
    for p in (
        NetworkProfile("loopback", 0.0, note="no added delay: the proxy's own cost alone"),
        NetworkProfile(
            "wired",
            20.0,
            1.0,
            note="fixed broadband or office line to a cloud region nearby: the FCC's"
            " Measuring Broadband America reports median idle latencies of ~10-30 ms",
        ),
        NetworkProfile(
            "lte",
            60.0,
            20.0,
            0.005,
            note="4G/LTE: public drive tests and crowd-sourced reports put LTE round trips"
            " at ~40-80 ms; 0.5% segment loss is a fair radio link",
        ),
        NetworkProfile(
            "satellite",
            600.0,
            20.0,
            note="geostationary satellite: 35,786 km up and down twice is ~480 ms of light"
            " travel alone; measured round trips are ~600 ms",
        ),
    )
}


def profile(name: str) -> NetworkProfile:
    """The profile of this name, or ConfigError naming the known ones."""
    try:
        return PROFILES[name.strip()]
    except KeyError:
        raise ConfigError(
            f"unknown network profile {name!r}; known: {', '.join(PROFILES)}"
        ) from None


class _Direction:
    """Bytes from ``src`` to ``dst``, each chunk held until its due time, in order."""

    def __init__(self, proxy: NetProxy, src: socket.socket, dst: socket.socket, name: str) -> None:
        self.proxy, self.src, self.dst, self.name = proxy, src, dst, name
        self.queue: deque[tuple[float, bytes]] = deque()  # (due, data); b"" is end of stream
        self.cond = threading.Condition()
        self.last_due = 0.0
        self.closed = False
        self.threads = [
            threading.Thread(target=self._read, name=f"netproxy-{name}-r", daemon=True),
            threading.Thread(target=self._write, name=f"netproxy-{name}-w", daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.src.recv(CHUNK)
            except OSError:
                data = b""
            now = time.monotonic()
            with self.cond:
                due = max(now + self.proxy.one_way_s(len(data)), self.last_due)
                self.last_due = due
                self.queue.append((due, data))
                self.cond.notify()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self.cond.wait(wait)
                    continue  # woken early (stop) or due now: look again
                self.queue.popleft()
            try:
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
            except OSError:
                return
            with self.proxy._lock:
                self.proxy.bytes_forwarded += len(data)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class NetProxy:
    """Listens on a free loopback port; each connection is forwarded to ``upstream_port``
    under ``profile``'s delay, jitter and loss. ``seed`` makes the draws repeatable."""

    def __init__(
        self, upstream_port: int, net: NetworkProfile, *, host: str = "127.0.0.1", seed: int = 0
    ) -> None:
        self.upstream = (host, upstream_port)
        self.profile = net
        self._rng = random.Random(seed)  # noqa: S311 - a network model, not a secret
        self._rng_lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket, list[_Direction]]] = []
        self._accepting: threading.Thread | None = None
        self._stopped = False
        self.connections = 0
        self.losses = 0  #: chunks that paid a retransmission timeout
        self.bytes_forwarded = 0

    # -- the model ------------------------------------------------------------------

    def one_way_s(self, nbytes: int) -> float:
        """Seconds a chunk of ``nbytes`` spends on the way (delay, jitter, loss recovery)."""
        p = self.profile
        ms = p.rtt_ms / 2.0
        with self._rng_lock:
            if p.jitter_ms:
                ms = max(0.0, ms + self._rng.uniform(-p.jitter_ms / 2.0, p.jitter_ms / 2.0))
            if p.loss and nbytes:
                segments = math.ceil(nbytes / MSS)
                lost = 1.0 - (1.0 - p.loss) ** segments
                rto = p.rto_ms
                while self._rng.random() < lost:
                    self.losses += 1
                    ms += rto
                    rto = min(2.0 * rto, RTO_MAX_MS)
                    lost = p.loss  # the resent segment alone can be lost again
        return ms / 1000.0

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> NetProxy:
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._accepting = threading.Thread(target=self._accept_loop, name="netproxy", daemon=True)
        self._accepting.start()
        log.info(
            "network proxy on 127.0.0.1:%d -> %s:%d (%s: %s)",
            self.port,
            *self.upstream,
            self.profile.name,
            self.profile.describe(),
        )
        return self

    def __enter__(self) -> NetProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.fileobj is self._wake_r:
                    return
                try:
                    client, _addr = self._listener.accept()
                except BlockingIOError:
                    continue
                except OSError:
                    return
                self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        client.setblocking(True)
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError as exc:
            log.warning("network proxy: upstream %s:%d refused: %s", *self.upstream, exc)
            client.close()
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n = self.connections = self.connections + 1
        ways = [
            _Direction(self, client, upstream, f"{n}-up"),
            _Direction(self, upstream, client, f"{n}-down"),
        ]
        with self._lock:
            if self._stopped:
                client.close()
                upstream.close()
                return
            self._conns.append((client, upstream, ways))
        for way in ways:
            way.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the listener and every connection; join every thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            conns = list(self._conns)
        self._wake_w.send(b"x")
        if self._accepting is not None:
            self._accepting.join(timeout_s)
        for client, upstream, ways in conns:
            for way in ways:
                way.close()
            for s in (client, upstream):
                with contextlib.suppress(OSError):  # already closed by the other side
                    s.shutdown(socket.SHUT_RDWR)
        for _client, _upstream, ways in conns:
            for way in ways:
                for t in way.threads:
                    t.join(timeout_s)
        for client, upstream, _ways in conns:
            client.close()
            upstream.close()
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def threads_alive(self) -> int:
        """Threads of this proxy still running (0 after ``stop``)."""
        with self._lock:
            ways = [w for _c, _u, ws in self._conns for w in ws]
        alive = sum(t.is_alive() for w in ways for t in w.threads)
        return alive + int(self._accepting is not None and self._accepting.is_alive())
