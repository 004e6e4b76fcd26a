"""Promises of docs/reliability.md about ``edge-agent run`` as a service, each checked on the
real command (a subprocess) or the real agent against a real mosquitto:

* a state directory read-only at start stops ``run`` with an ``OutboxError`` naming it;
* a hung scoring loop stops the ``WATCHDOG=1`` pings, so systemd's ``WatchdogSec`` fires;
* the retained last will ``offline`` is published by the broker when the agent is SIGKILLed;
* ``run --exit-when-drained`` exits 3 when hard cases are left in the outbox;
* a publish refused by the broker is retried every ``link.retry_refused_s``, and the refusals
  are counted in the telemetry the agent publishes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import load_settings
from tests.broker import Mosquitto, free_port
from tests.conftest import ROOT, make_fake_pack, puback_env, settings_env
from tests.integration.test_faults import fake_agent, fake_line, wait_until, write_acl
from tests.mqtt_peer import Collector
from tests.stall import STALL_MARK
from tests.storage import read_only_dir

pytestmark = pytest.mark.integration

UNIT = ROOT / "systemd" / "edge-agent.service"


def agent_env(broker_port: int, prefix: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of an ``edge-agent run`` on the fake pack, reading UDP datagrams."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    settings = {
        "model_pack": str(make_fake_pack(tmp_path / "pack")),
        "source_kind": "udp",
        "source_path": f"127.0.0.1:{free_port()}",
        "router_cooldown_s": "0",
        "router_max_urgent_per_minute": "100000",
        **extra,
    }
    env.update(settings_env(broker_port, prefix, tmp_path / "state", **settings))
    return env


def send_udp(env: dict[str, str], lines: list[bytes]) -> None:
    host, _, port = env["EDGE_AGENT_SOURCE_PATH"].rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for line in lines:
            s.sendto(line, (host, int(port)))


# -- a read-only state directory at start ------------------------------------------------


def test_run_on_a_state_dir_read_only_at_start_exits_1_naming_the_outbox(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    env = agent_env(broker.port, topic_prefix, tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    with read_only_dir(state):
        proc = subprocess.run(
            [sys.executable, "-m", "edge_agent", "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"edge-agent: {state / 'outbox.db'}: cannot open the outbox" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the systemd watchdog ------------------------------------------------------------------


class NotifySocket:
    """systemd's side of ``NOTIFY_SOCKET``: a datagram socket that records every message
    with the time it came and the sender's PID (from ``SCM_CREDENTIALS``, as systemd checks
    ``NotifyAccess=main`` with)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        creds = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds])[0]
            with self._lock:
                self.messages.append((time.monotonic(), data.decode(), pid))

    def pings(self) -> list[tuple[float, int]]:
        with self._lock:
            return [(t, pid) for t, m, pid in self.messages if "WATCHDOG=1" in m.split("\n")]

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return wait_until(predicate, timeout, 0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def shipped_watchdog_s() -> float:
    """``WatchdogSec=`` of the shipped unit, in seconds (the unit also has to be a notify
    service that takes notifications from its main process only)."""
    text = UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.M)
    assert re.search(r"^NotifyAccess=main$", text, re.M)
    match = re.search(r"^WatchdogSec=(\d+)$", text, re.M)
    assert match, "the shipped unit has no WatchdogSec="
    return float(match.group(1))


@pytest.fixture
def stalling_agent(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> Iterator[Callable[[float], tuple[subprocess.Popen[bytes], NotifySocket, dict[str, str]]]]:
    started: list[tuple[subprocess.Popen[bytes], NotifySocket]] = []

    def start(watchdog_s: float) -> tuple[subprocess.Popen[bytes], NotifySocket, dict[str, str]]:
        notify = NotifySocket(tmp_path / "notify.sock")
        env = agent_env(broker.port, topic_prefix, tmp_path)
        env.update({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))})
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stall", "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append((proc, notify))
        return proc, notify, env

    yield start
    for proc, notify in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        notify.close()


@pytest.mark.parametrize(
    "watchdog_s",
    [
        pytest.param(3.0, id="WatchdogSec=3"),
        pytest.param(shipped_watchdog_s(), id="shipped-unit", marks=pytest.mark.slow),
    ],
)
def test_a_hung_scoring_loop_stops_the_watchdog_pings_so_watchdogsec_fires(
    stalling_agent: Callable[[float], tuple[subprocess.Popen[bytes], NotifySocket, dict[str, str]]],
    watchdog_s: float,
) -> None:
    """A real ``edge-agent run`` under a notify socket with ``WATCHDOG_USEC`` set: while
    healthy it pings more often than systemd's deadline, from its main PID; once the scorer
    hangs (the loop is stuck inside a model call) the pings stop for longer than
    ``WatchdogSec``, while the process stays alive — only systemd's watchdog can restart it.
    The default run uses a 3 s watchdog (pings every 1.5 s, a margin for a loaded machine);
    the long mode the shipped unit's own (30 s)."""
    proc, notify, env = stalling_agent(watchdog_s)
    assert notify.wait(lambda: len(notify.pings()) >= 3, 60 + 3 * watchdog_s), notify.messages
    send_udp(env, [json.dumps({"values": [[1, 0.95, 0, 0], [0, 0, 0, 0]]}).encode()])
    assert notify.wait(lambda: len(notify.pings()) >= 5, 3 * watchdog_s)
    healthy = notify.pings()
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(healthy)]
    # systemd kills a service whose pings are further apart than WatchdogSec: a healthy agent
    # pings every half of it (the margin is the other half).
    assert max(gaps) < watchdog_s, gaps
    assert {pid for _, pid in healthy} == {proc.pid}  # NotifyAccess=main accepts them
    stalled_at = time.monotonic()
    send_udp(env, [json.dumps({"values": [[STALL_MARK, 0.95, 0, 0], [0, 0, 0, 0]]}).encode()])
    # Watch for longer than systemd's deadline (and the ping interval twice over).
    time.sleep(watchdog_s * 1.5)
    assert proc.poll() is None, "the agent exited by itself instead of hanging"
    last_ping = notify.pings()[-1][0]
    # At most a ping that was already due when the reading came (the loop pings before it
    # scores a group); none after the scorer hung.
    assert last_ping <= stalled_at + watchdog_s / 2, (last_ping - stalled_at, watchdog_s)
    silent_for = time.monotonic() - last_ping
    assert silent_for > watchdog_s, f"silent for {silent_for:.1f} s only"
    print(
        f"\nwatchdog {watchdog_s} s: healthy gaps max {max(gaps):.2f} s; silent {silent_for:.1f} s"
    )


# -- the last will -------------------------------------------------------------------------


class StatusWatcher:
    """Subscribes to a device's status topic; keeps (payload, retained) of what comes."""

    def __init__(self, port: int, topic: str) -> None:
        self.got: list[tuple[dict[str, object], bool]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.got.append(
            (json.loads(m.payload), bool(m.retain))
        )
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def states(self) -> list[tuple[object, bool]]:
        return [(p["state"], r) for p, r in list(self.got)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_the_broker_publishes_the_retained_last_will_when_the_agent_is_sigkilled(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    """SIGKILL leaves the agent no chance to say ``offline`` itself: the broker must publish
    the will (retained) when the connection drops, so a dashboard sees the device go."""
    env = agent_env(broker.port, topic_prefix, tmp_path)
    topic = f"{topic_prefix}/dev1/status"
    live = StatusWatcher(broker.port, topic)
    with subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            assert wait_until(lambda: ("online", False) in live.states(), 60), live.got
        finally:
            proc.kill()
        proc.wait(10)
    assert wait_until(lambda: live.states()[-1][0] == "offline", 10), live.got
    will = live.got[-1][0]
    assert (will["device"], will["model"]) == ("dev1", "fake-pack@0.0.1")
    later = StatusWatcher(broker.port, topic)  # a dashboard that connects afterwards
    try:
        assert wait_until(lambda: bool(later.got), 5)
        assert later.states() == [("offline", True)]
    finally:
        later.close()
        live.close()


# -- run --exit-when-drained ---------------------------------------------------------------


@pytest.mark.parametrize("far_side", ["no-cloud-worker", "broker-unreachable", "answered"])
def test_exit_when_drained_exits_3_when_hard_cases_are_left_and_keeps_them(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path, far_side: str
) -> None:
    """Hard cases nobody answers (no cloud worker subscribed, or no broker at all) are still
    in the outbox when the drain timeout passes: exit 3, and they stay stored for the next
    run. With a cloud tier that answers, the same input drains and exits 0."""
    lines = tmp_path / "in.jsonl"
    lines.write_text(
        "".join(
            json.dumps({"id": i, "values": [[0, 0.3, 0, 0], [0, 0, 0, 0]]}) + "\n" for i in range(5)
        )
    )
    port = free_port() if far_side == "broker-unreachable" else broker.port
    env = agent_env(port, topic_prefix, tmp_path, source_kind="jsonl", source_path=str(lines))
    collector = (
        Collector(broker.port, topic_prefix, answer=True) if far_side == "answered" else None
    )
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "run",
                "--exit-when-drained",
                "--drain-timeout",
                "3",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        if collector is not None:
            collector.close()
    db = sqlite3.connect(tmp_path / "state" / "outbox.db")
    left = db.execute("SELECT COUNT(*) FROM messages WHERE cls = 0").fetchone()[0]
    db.close()
    if far_side == "answered":
        assert (proc.returncode, left) == (0, 0), proc.stderr[-2000:]
        return
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert left == 5
    assert "drain ended before everything was delivered" in proc.stderr


# -- refused publishes: retried every retry_refused_s, counted in published telemetry ------


def test_refused_publishes_are_retried_every_retry_refused_s_and_counted_in_published_telemetry(
    topic_prefix: str, tmp_path: Path
) -> None:
    retry_s = 1.0
    acl = tmp_path / "broker" / "acl"
    acl.parent.mkdir()
    # The device may say its status and publish telemetry, not its hard cases.
    write_acl(
        acl,
        f"topic read {topic_prefix}/#\n"
        f"topic readwrite {topic_prefix}/dev1/status\n"
        f"topic write {topic_prefix}/dev1/telemetry\n",
    )
    b = Mosquitto(tmp_path / "broker", extra=f"user root\nacl_file {acl}").start()
    env = puback_env(
        b.port,
        topic_prefix,
        tmp_path / "state",
        router_cooldown_s="0",
        router_max_urgent_per_minute="1000000",
        link_retry_refused_s=str(retry_s),
        link_inflight_window="1",  # see test_faults: one refusal per connection is seen
        telemetry_interval_s="0.2",
    )
    accepted: list[str] = []
    agent = fake_agent(load_settings(None, env=env), make_fake_pack(tmp_path / "pack"), accepted)
    link = agent.link
    telemetry = Collector(b.port, topic_prefix, extra_topics=(f"{topic_prefix}/+/telemetry",))
    collectors = [telemetry]
    link.start()
    agent.telemetry.start()
    try:
        assert link.connected.wait(10)
        agent.pipeline.process([fake_line(1, 0.3)])
        assert wait_until(lambda: len(accepted) == 1, 5)
        refusals: list[float] = []
        deadline = time.monotonic() + 5 * retry_s
        while time.monotonic() < deadline:
            while len(refusals) < link.counters["nacked_urgent"]:
                refusals.append(time.monotonic())
            time.sleep(0.005)
        gaps = [b - a for a, b in itertools.pairwise(refusals)]
        # Retried: not before retry_refused_s (the behaviour), and not much later either:
        # the generous bound is the pause, the reconnect after mosquitto's disconnect (at
        # most link.reconnect_max_s = 0.5 s here), a link loop turn (0.5 s) and slack for
        # a loaded machine.
        assert len(refusals) >= 3, refusals
        assert min(gaps) >= retry_s * 0.98, gaps
        assert max(gaps) <= retry_s + 0.5 + 0.5 + 1.5, gaps

        def published() -> list[dict[str, Any]]:
            return [
                json.loads(p)
                for t, p, _ in list(telemetry.messages)
                if t == f"{topic_prefix}/dev1/telemetry"
            ]

        # What an operator's telemetry shows while the ACL refuses the device's hard cases.
        def refusals_published() -> bool:
            return any(m["link"].get("nacked_urgent", 0) >= 3 for m in published())

        assert wait_until(refusals_published, 5), published()[-1:]
        assert agent.outbox.depth()["urgent"] == 1
        # The operator fixes the ACL; the broker restarts on the same port.
        write_acl(acl, "topic readwrite #\n")
        b.stop()
        b.start()
        hard = Collector(b.port, topic_prefix)
        collectors.append(hard)
        assert hard.wait_for(set(accepted), 15) == set()
        assert wait_until(lambda: agent.outbox.depth()["urgent"] == 0, 5)
        nacked = link.counters["nacked_urgent"]

        def settled() -> bool:
            last = published()[-1]["link"] if published() else {}
            return bool(last.get("published_urgent") == 1 and last.get("nacked_urgent") == nacked)

        # The published counters, once delivered: exactly what the link counted.
        assert wait_until(settled, 10), published()[-1:]
    finally:
        for c in collectors:
            c.close()
        agent.close()
        b.stop()
