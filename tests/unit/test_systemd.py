"""sd_notify against a real AF_UNIX datagram socket that stands in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.util.systemd import Heartbeat, Notifier, Watchdog, clean_status


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a bound datagram socket we read from."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)
        self.address = address
        self.env_value = env_value

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def recv(self) -> str:
        return self.sock.recv(4096).decode("utf-8")

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode("utf-8"))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify"
    assert len(os.fsencode(path)) < 108, "AF_UNIX path limit"
    fake = FakeSystemd(str(path), str(path))
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode(), "@" + name)
    yield fake
    fake.close()


@pytest.fixture
def notifier() -> Iterator[Callable[..., Notifier]]:
    """Makes Notifiers and closes their sockets at the end (warnings are errors)."""
    made: list[Notifier] = []

    def make(env: dict[str, str], **kwargs: Any) -> Notifier:
        n = Notifier(env, **kwargs)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


# --- Notifier ---------------------------------------------------------------------------------


def test_ready_status_watchdog_stopping_arrive(systemd: FakeSystemd) -> None:
    n = Notifier(systemd.env())
    assert n.enabled
    assert n.ready("scoring with basicmotions@1.0")
    assert systemd.recv() == "READY=1\nSTATUS=scoring with basicmotions@1.0"
    assert n.status("outbox 3 urgent, 10 batch")
    assert systemd.recv() == "STATUS=outbox 3 urgent, 10 batch"
    assert n.watchdog()
    assert systemd.recv() == "WATCHDOG=1"
    assert n.stopping()
    assert systemd.recv() == "STOPPING=1"
    assert n.stopping("draining outbox")
    assert systemd.recv() == "STOPPING=1\nSTATUS=draining outbox"
    assert n.ready()
    assert systemd.recv() == "READY=1"
    assert (n.sent, n.errors) == (6, 0)
    n.close()


def test_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    with Notifier(abstract_systemd.env()) as n:
        assert n.ready("up")
        assert abstract_systemd.recv() == "READY=1\nSTATUS=up"
        assert n.watchdog()
        assert abstract_systemd.recv() == "WATCHDOG=1"


def test_status_is_one_capped_line(systemd: FakeSystemd) -> None:
    n = Notifier(systemd.env(), max_status_chars=40)
    n.status("line one\nREADY=1\r\nline\tthree " + "x" * 100)
    got = systemd.recv()
    assert "\n" not in got
    assert got.startswith("STATUS=line one READY=1 line three xx")
    assert got.endswith("...")
    assert len(got) == len("STATUS=") + 40
    n.close()


def test_status_of_only_whitespace_sends_nothing(systemd: FakeSystemd) -> None:
    n = Notifier(systemd.env())
    assert not n.status("")
    assert systemd.pending() == []


def test_clean_status() -> None:
    assert clean_status("a\nb") == "a b"
    assert clean_status("ünïcode ok") == "ünïcode ok"
    assert clean_status("abcdef", 5) == "ab..."
    assert clean_status("abcdef", 2) == "ab"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert not n.ready("x")
    assert not n.status("x")
    assert not n.watchdog()
    assert not n.stopping()
    assert (n.sent, n.errors) == (0, 0)
    assert n._sock is None  # no socket was even opened


def test_unsupported_address_is_disabled_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.util.systemd"):
        n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert not n.ready()
    assert "vsock:2:1234" in caplog.text


def test_socket_removed_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify"
    fake = FakeSystemd(str(path), str(path))
    n = Notifier(fake.env())
    assert n.ready()
    fake.close()
    path.unlink()
    with caplog.at_level(logging.DEBUG, logger="edge_agent.util.systemd"):
        assert not n.watchdog()
        assert not n.status("still here")
        assert not n.stopping()
    assert (n.sent, n.errors) == (1, 3)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    # systemd comes back (e.g. after daemon-reexec): sending works again.
    again = FakeSystemd(str(path), str(path))
    assert n.watchdog()
    assert again.recv() == "WATCHDOG=1"
    again.close()
    n.close()


def test_full_queue_never_blocks(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    fake = FakeSystemd(str(path), str(path))  # never reads: its queue fills up
    n = Notifier(fake.env())

    def flood() -> None:
        for _ in range(5000):
            n.status("x" * 150)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "sending blocked on a full systemd queue"
    assert n.errors > 0
    assert n.sent + n.errors == 5000
    fake.close()
    n.close()


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    systemd: FakeSystemd, extra: dict[str, str], interval: float | None
) -> None:
    assert Notifier(systemd.env(**extra)).watchdog_interval_s == interval


def test_watchdog_interval_needs_a_socket() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s is None


def test_explicit_pid_is_compared_with_watchdog_pid(systemd: FakeSystemd) -> None:
    env = systemd.env(WATCHDOG_USEC="2000000", WATCHDOG_PID="4242")
    assert Notifier(env, pid=4242).watchdog_interval_s == 1.0
    assert Notifier(env, pid=4243).watchdog_interval_s is None


# --- Watchdog ---------------------------------------------------------------------------------


def test_watchdog_pings_at_most_once_per_interval(
    systemd: FakeSystemd, notifier: Callable[..., Notifier]
) -> None:
    clock = Clock()
    wd = Watchdog(notifier(systemd.env(WATCHDOG_USEC="10000000")), clock=clock)
    assert wd.enabled
    assert wd.seconds_until_due() == 0.0
    assert wd.maybe_ping()  # the first call pings at once
    assert wd.last_ping == 500.0
    for dt in (1.0, 2.0, 4.9):  # interval is 5 s (half of WATCHDOG_USEC)
        clock.t = 500.0 + dt
        assert not wd.maybe_ping()
    assert wd.seconds_until_due() == pytest.approx(0.1)
    clock.t = 505.0
    assert wd.maybe_ping()
    assert wd.last_ping == 505.0
    clock.t = 509.0
    assert not wd.maybe_ping()
    clock.t = 520.0
    assert wd.maybe_ping()
    assert systemd.pending() == ["WATCHDOG=1"] * 3
    assert (wd.pings, wd.skipped) == (3, 0)


def test_watchdog_pings_only_while_every_check_passes(
    systemd: FakeSystemd, notifier: Callable[..., Notifier]
) -> None:
    clock = Clock()
    link_ok = [True]
    scoring_ok = [True]
    wd = Watchdog(
        notifier(systemd.env(WATCHDOG_USEC="10000000")),
        [lambda: link_ok[0], lambda: scoring_ok[0]],
        clock=clock,
    )
    assert wd.maybe_ping()
    assert systemd.pending() == ["WATCHDOG=1"]

    link_ok[0] = False  # the link thread hangs
    for step in range(1, 40):
        clock.t = 500.0 + step
        assert not wd.maybe_ping()
    assert systemd.pending() == []  # systemd would now kill and restart the service
    assert wd.last_ping == 500.0
    # Rechecked every 0.5 s (a tenth of the interval) while unhealthy, from 505 s on.
    assert wd.skipped == 35

    link_ok[0] = True
    scoring_ok[0] = False
    clock.t = 541.0
    assert not wd.maybe_ping()
    assert wd.skipped == 36

    scoring_ok[0] = True
    clock.t = 541.5
    assert wd.maybe_ping()
    assert wd.last_ping == 541.5
    assert systemd.pending() == ["WATCHDOG=1"]


def test_unhealthy_retry_comes_before_systemds_deadline(
    systemd: FakeSystemd, notifier: Callable[..., Notifier]
) -> None:
    clock = Clock()
    healthy = [True]
    wd = Watchdog(
        notifier(systemd.env(WATCHDOG_USEC="30000000")), [lambda: healthy[0]], clock=clock
    )
    assert wd.maybe_ping()
    healthy[0] = False
    clock.t = 515.0
    assert not wd.maybe_ping()
    healthy[0] = True  # a blip: recovers well before systemd's 30 s deadline
    clock.t = 515.0 + wd.seconds_until_due()  # type: ignore[operator]
    assert clock.t < 530.0
    assert wd.maybe_ping()


def test_a_raising_check_counts_as_unhealthy(
    systemd: FakeSystemd, notifier: Callable[..., Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    wd = Watchdog(notifier(systemd.env(WATCHDOG_USEC="10000000")), [broken], clock=Clock())
    with caplog.at_level(logging.WARNING, logger="edge_agent.util.systemd"):
        assert not wd.maybe_ping()
    assert wd.skipped == 1
    assert "boom" in caplog.text
    assert systemd.pending() == []


def test_unhealthy_is_logged_once_per_episode(
    systemd: FakeSystemd, notifier: Callable[..., Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    healthy = [False]
    wd = Watchdog(
        notifier(systemd.env(WATCHDOG_USEC="10000000")), [lambda: healthy[0]], clock=clock
    )
    with caplog.at_level(logging.WARNING, logger="edge_agent.util.systemd"):
        for step in range(10):
            clock.t = 500.0 + step
            wd.maybe_ping()
    assert wd.skipped == 10
    assert sum("withholding" in r.getMessage() for r in caplog.records) == 1


def test_watchdog_is_a_no_op_without_systemd_watchdog(
    systemd: FakeSystemd, notifier: Callable[..., Notifier]
) -> None:
    calls = []

    def check() -> bool:
        calls.append(1)
        return True

    for n in (notifier({}), notifier(systemd.env())):  # no socket / no WATCHDOG_USEC
        wd = Watchdog(n, [check], clock=Clock())
        assert not wd.enabled
        assert wd.seconds_until_due() is None
        assert not wd.maybe_ping()
        assert wd.last_ping is None
    assert calls == []
    assert systemd.pending() == []


def test_watchdog_interval_override(
    systemd: FakeSystemd, notifier: Callable[..., Notifier]
) -> None:
    clock = Clock()
    wd = Watchdog(notifier(systemd.env(WATCHDOG_USEC="10000000")), clock=clock, interval_s=1.0)
    assert wd.maybe_ping()
    clock.t = 501.0
    assert wd.maybe_ping()
    with pytest.raises(ValueError, match="interval_s"):
        Watchdog(notifier({}), interval_s=0)


def test_heartbeat_check(systemd: FakeSystemd, notifier: Callable[..., Notifier]) -> None:
    clock = Clock()
    link = Heartbeat("link", clock)
    wd = Watchdog(notifier(systemd.env(WATCHDOG_USEC="10000000")), [link.fresh(8.0)], clock=clock)
    assert wd.maybe_ping()
    clock.t = 505.0
    link.beat()
    clock.t = 510.0
    assert wd.maybe_ping()  # last beat 5 s ago
    clock.t = 520.0
    assert not wd.maybe_ping()  # last beat 15 s ago: the link thread is stuck
    assert link.age_s() == 15.0
    link.beat()
    clock.t = 521.0
    assert wd.maybe_ping()
    assert (wd.pings, wd.skipped) == (3, 1)


def test_heartbeat_check_is_named_in_the_log(
    systemd: FakeSystemd, notifier: Callable[..., Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    hb = Heartbeat("link", clock)
    wd = Watchdog(notifier(systemd.env(WATCHDOG_USEC="10000000")), [hb.fresh(1.0)], clock=clock)
    clock.t = 510.0
    with caplog.at_level(logging.WARNING, logger="edge_agent.util.systemd"):
        assert not wd.maybe_ping()
    assert "link heartbeat" in caplog.text
