"""``edge-agent fleet-sim``: many simulated devices against real cloud workers, in one run.

Each simulated device is its own MQTT v5 session (its own paho client and TCP connection,
clean start) speaking the device protocol of docs/topics.md: hard cases on
``<prefix>/<device>/hard`` with the idempotency key as a user property, ResponseTopic and
CorrelationData; batches on ``.../batch``; its verdict topic subscribed; a retained ``online``
status and an ``offline`` last will; reconnects with the project's full-jitter backoff; every
case sent again until a verdict for it arrives (``link.confirm = "verdict"``). All devices run
on one thread: paho's sockets are driven from one selector, so 1,000 devices cost one
process. The windows are real BasicMotions test windows; hard cases arrive as a Poisson
process per device, with bursts (a share of the devices sending several cases at once).

It starts a local mosquitto and ``--workers`` ``edge-agent cloud`` processes in one shared
group (or uses a broker given with ``--port`` and workers already running), can SIGKILL a
worker and restart the broker mid-run, and reports verdict latency (p50/p99 over the fleet and
per device), verdicts/s, missing verdicts, duplicates, and the CPU of the broker and of each
worker (per verdict).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import random
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.util.backoff import full_jitter
from edge_agent.util.stats import percentile
from edge_agent.wire.messages import (
    IDEMPOTENCY_PROPERTY,
    SCHEMA_VERSION,
    Batch,
    HardCase,
    LocalDecision,
    Tier,
    Topics,
    encoder,
    status_payload,
)


@dataclass
class FleetOptions:
    devices: int = 1000
    duration_s: float = 120.0
    #: Mean hard cases per device per second (Poisson), before bursts.
    case_rate: float = 0.1
    #: Share of hard cases that go to the batch tier (sent every ``batch_wait_s``).
    batch_share: float = 0.5
    batch_wait_s: float = 5.0
    #: Every ``burst_every_s`` a ``burst_share`` of the devices send ``burst_cases`` at once.
    burst_every_s: float = 20.0
    burst_share: float = 0.1
    burst_cases: int = 5
    #: A case without a verdict after this long is sent again.
    resend_s: float = 15.0
    #: After the run: how long to wait for the verdicts still missing.
    drain_s: float = 30.0
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 30.0
    prefix: str = "fleet"
    host: str = "127.0.0.1"
    port: int = 0
    seed: int = 1
    #: The real windows the cases carry (values only); filled by the caller.
    windows: list[list[list[float]]] = field(default_factory=list)


@dataclass
class _Case:
    tier: str
    case: HardCase
    first_ns: int
    sent_at: float


class SimDevice:
    """One device: its paho client, its cases waiting for verdicts, its reconnect schedule."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.name = f"sim-{index:05d}"
        self.seq = 0
        self.readings = 0
        self.pending: dict[str, _Case] = {}
        self.batch: list[HardCase] = []
        self.batch_due = 0.0
        self.connected = False
        self.attempt = 0
        self.client = self._client()

    def _client(self) -> mqtt.Client:
        f = self.fleet
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.name,
            protocol=mqtt.MQTTv5,
        )
        c.will_set(f.topics.status(self.name), status_payload(self.name, "offline", "sim"), 1, True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_socket_open = f.socket_open
        c.on_socket_close = f.socket_close
        c.on_socket_register_write = f.want_write
        c.on_socket_unregister_write = f.done_writing
        c.user_data_set(self)
        return c

    def connect(self) -> None:
        f = self.fleet
        f.counters["connect_attempts"] += 1
        try:
            self.client.connect(f.opts.host, f.opts.port, keepalive=30, clean_start=True)
        except OSError:
            self._lost()

    def _lost(self) -> None:
        self.connected = False
        delay = full_jitter(
            self.fleet.opts.reconnect_min_s, self.fleet.opts.reconnect_max_s, self.attempt
        )
        self.attempt += 1
        self.fleet.schedule(time.monotonic() + delay, self, "connect")

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.fleet.counters["connect_refused"] += 1
            return
        f = self.fleet
        self.connected = True
        self.attempt = 0
        f.counters["connects"] += 1
        f.connected_at[self.name] = time.monotonic()
        c.subscribe(f.topics.verdict(self.name) + "/#", qos=1)  # "#" matches the parent too
        c.publish(f.topics.status(self.name), status_payload(self.name, "online", "sim"), 1, True)
        for p in self.pending.values():  # what was not answered goes again at once
            p.sent_at = -1e9  # due now, counted as re-sent

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        if self.connected:
            self.fleet.counters["disconnects"] += 1
            self.fleet.disconnected_at.setdefault(self.name, time.monotonic())
        self._lost()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now_ns = time.monotonic_ns()
        try:
            data = json.loads(msg.payload)
        except ValueError:
            self.fleet.counters["bad_verdicts"] += 1
            return
        for v in data.get("verdicts", [data]):
            key = v.get("key", "")
            p = self.pending.pop(key, None)
            if p is None:
                self.fleet.counters["duplicate_verdicts"] += 1
                continue
            self.fleet.answered(self.name, p, now_ns)

    def new_cases(self, n: int, now: float) -> None:
        """``n`` new hard cases (urgent or batch by the fleet's share)."""
        f = self.fleet
        for _ in range(n):
            self.seq += 1
            self.readings += f.rng.randint(5, 50)
            tier = Tier.BATCH if f.rng.random() < f.opts.batch_share else Tier.URGENT
            case = HardCase(
                v=SCHEMA_VERSION,
                key=f"{self.name}:{self.seq}",
                device=self.name,
                seq=self.seq,
                values=f.opts.windows[f.rng.randrange(len(f.opts.windows))],
                local=LocalDecision("walking", 0.41, "low_confidence", "sim@1"),
                tier=tier,
                deadline_ms=2000.0 if tier == Tier.URGENT else None,
                readings_total=self.readings,
            )
            self.pending[case.key] = _Case(tier, case, time.monotonic_ns(), 0.0)
            f.counters[f"cases_{tier}"] += 1
        self.flush(now)

    def flush(self, now: float) -> None:
        """Send what is due: new and re-sent urgent cases; the batch when its wait is over."""
        if not self.connected:
            return
        f = self.fleet
        due_batch = []
        for p in self.pending.values():
            if p.sent_at and now - p.sent_at < f.opts.resend_s:
                continue
            if p.sent_at:
                f.counters["resent"] += 1
            if p.tier == "urgent":
                p.sent_at = now
                self._publish(f.topics.hard(self.name), encoder.encode(p.case), p.case.key, True)
            else:
                due_batch.append(p)
        if due_batch and (now >= self.batch_due or len(due_batch) >= 20):
            for p in due_batch:
                p.sent_at = now
            cases = [p.case for p in due_batch]
            body = encoder.encode(Batch(v=SCHEMA_VERSION, device=self.name, cases=cases))
            self._publish(f.topics.batch(self.name), body, f"{cases[0].key}+{len(cases)}", False)
            self.batch_due = now + f.opts.batch_wait_s
        elif due_batch and not self.batch_due:
            self.batch_due = now + f.opts.batch_wait_s

    def _publish(self, topic: str, body: bytes, key: str, urgent: bool) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [(IDEMPOTENCY_PROPERTY, key)]
        if urgent:
            props.ResponseTopic = self.fleet.topics.verdict(self.name)
            props.CorrelationData = key.encode()
        self.client.publish(topic, body, qos=1, properties=props)
        self.fleet.counters["published"] += 1


class Fleet:
    """The simulated devices and the one loop that drives their sockets."""

    def __init__(self, opts: FleetOptions) -> None:
        if not opts.windows:
            raise ValueError("the fleet needs real windows to send")
        self.opts = opts
        self.rng = random.Random(opts.seed)  # noqa: S311 - a simulation, not secrecy
        self.topics = Topics(opts.prefix)
        self.sel = selectors.DefaultSelector()
        self.counters: Counter[str] = Counter()
        self.latencies_ms: dict[str, list[float]] = {"urgent": [], "batch": []}
        self.per_device: dict[str, list[float]] = {}  #: urgent verdict latencies
        self.connected_at: dict[str, float] = {}
        self.disconnected_at: dict[str, float] = {}
        self._events: list[tuple[float, int, SimDevice, str]] = []
        self._n = 0
        self.devices = [SimDevice(self, i) for i in range(opts.devices)]

    # -- paho's external-loop callbacks ------------------------------------------------

    def socket_open(self, client: mqtt.Client, device: Any, sock: Any) -> None:
        self.sel.register(sock, selectors.EVENT_READ, client)

    def socket_close(self, _client: mqtt.Client, _device: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # a socket already closed
            self.sel.unregister(sock)

    def want_write(self, client: mqtt.Client, _device: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # a socket already closed
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def done_writing(self, client: mqtt.Client, _device: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # a socket already closed
            self.sel.modify(sock, selectors.EVENT_READ, client)

    # -- scheduling --------------------------------------------------------------------

    def schedule(self, at: float, device: SimDevice, what: str) -> None:
        self._n += 1
        heapq.heappush(self._events, (at, self._n, device, what))

    def answered(self, device: str, p: _Case, now_ns: int) -> None:
        ms = (now_ns - p.first_ns) / 1e6
        self.latencies_ms[p.tier].append(ms)
        if p.tier == Tier.URGENT:
            self.per_device.setdefault(device, []).append(ms)
        self.counters[f"verdicts_{p.tier}"] += 1

    def verdicts(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values())

    def missing(self) -> int:
        return sum(len(d.pending) for d in self.devices)

    def online(self) -> int:
        return sum(d.connected for d in self.devices)

    def run_for(
        self, seconds: float, *, new_cases: bool, hooks: dict[float, Any] | None = None
    ) -> None:
        """Drive every socket for ``seconds``; send new cases while ``new_cases``; call each
        hook once when its time (seconds from now) comes."""
        start = time.monotonic()
        end = start + seconds
        pending_hooks = sorted((hooks or {}).items())
        next_second = start
        next_burst = start + self.opts.burst_every_s
        while (now := time.monotonic()) < end:
            while pending_hooks and now - start >= pending_hooks[0][0]:
                pending_hooks.pop(0)[1]()
            while self._events and self._events[0][0] <= now:
                _, _, device, what = heapq.heappop(self._events)
                if what == "connect":
                    device.connect()
                elif what == "case" and new_cases:
                    device.new_cases(1, now)
                    self._next_case(device, now)
            if now >= next_second:  # keep-alives, time-outs, batch waits and re-sends
                next_second = now + 0.5
                for d in self.devices:
                    d.client.loop_misc()
                    d.flush(now)
            if new_cases and now >= next_burst:
                next_burst = now + self.opts.burst_every_s
                for d in self.rng.sample(
                    self.devices, int(self.opts.burst_share * len(self.devices))
                ):
                    d.new_cases(self.opts.burst_cases, now)
            for key, mask in self.sel.select(timeout=0.005):
                client: mqtt.Client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()

    def _next_case(self, device: SimDevice, now: float) -> None:
        if self.opts.case_rate > 0:
            self.schedule(now + self.rng.expovariate(self.opts.case_rate), device, "case")

    def start(self, connect_over_s: float = 3.0) -> None:
        now = time.monotonic()
        for i, d in enumerate(self.devices):
            self.schedule(now + connect_over_s * i / len(self.devices), d, "connect")
            self._next_case(d, now + connect_over_s)

    def close(self) -> None:
        for d in self.devices:
            try:
                d.client.disconnect()
                d.client.loop_write()
            except (OSError, ValueError):
                pass
            sock = d.client.socket()
            if isinstance(sock, socket.socket):
                sock.close()
        self.sel.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(values: list[float], q: float) -> float | None:
    v = percentile(values, q)
    return None if v is None else round(v, 2)


def latency_report(fleet: Fleet) -> dict[str, Any]:
    """Verdict latency (first send of a case to its first verdict) per tier over the fleet,
    and the spread of the urgent p99 over the devices. A batch case's includes its wait for
    the batch (``batch_wait_s``)."""
    out: dict[str, Any] = {}
    for tier, lat in fleet.latencies_ms.items():
        out[tier] = {
            "verdicts": len(lat),
            "p50_ms": _ms(lat, 50),
            "p99_ms": _ms(lat, 99),
            "max_ms": round(max(lat), 2) if lat else None,
        }
    per_device_p99 = [p for v in fleet.per_device.values() if (p := percentile(v, 99)) is not None]
    out["urgent"]["per_device_p99_ms_median"] = _ms(per_device_p99, 50)
    out["urgent"]["per_device_p99_ms_max"] = (
        round(max(per_device_p99), 2) if per_device_p99 else None
    )
    return out
