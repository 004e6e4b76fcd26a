"""sd_notify for systemd services, without libsystemd: READY / STATUS / WATCHDOG / STOPPING.

systemd tells a ``Type=notify`` service where to report by three environment
variables, read once when a :class:`Notifier` is made:

``NOTIFY_SOCKET``
    an ``AF_UNIX`` datagram socket: a file system path (``/run/systemd/notify``)
    or an abstract address written with a leading ``@``.
``WATCHDOG_USEC``
    set when the unit has ``WatchdogSec=``: the service must send ``WATCHDOG=1``
    more often than this, or systemd kills and (with ``Restart=``) restarts it.
``WATCHDOG_PID``
    the process the watchdog settings are meant for; a child that inherited the
    environment must not ping on its parent's behalf.

Without ``NOTIFY_SOCKET`` (a terminal, a test, a container) every method is a
no-op that costs one attribute check. Sending never raises and never blocks:
the socket is non-blocking, and a failure (systemd gone, socket removed, its
queue full) is counted in :attr:`Notifier.errors` and logged once at warning
level, because a service must not die or stall over its status report.

:class:`Watchdog` decides *whether* to ping. The main loop calls
:meth:`Watchdog.maybe_ping` every iteration; a ping goes out at most once per
:attr:`Notifier.watchdog_interval_s` and only while every health check passes,
so a hung main loop (nobody calls it) and a hung worker thread (its check
fails, see :class:`Heartbeat`) both stop the pings, and systemd restarts the
service. The main loop must wake up at least every
:meth:`Watchdog.seconds_until_due` seconds even when no input arrives, or an
idle but healthy service is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType

log = logging.getLogger(__name__)

HealthCheck = Callable[[], bool]
Clock = Callable[[], float]

DEFAULT_MAX_STATUS_CHARS = 200
# While a health check fails, look again after this fraction of the ping interval, so
# that a short blip recovers before systemd's deadline (the interval is half of it).
DEFAULT_RETRY_FRACTION = 0.1

_CONTROL = dict.fromkeys((*range(0x20), 0x7F), " ")


def clean_status(text: str, max_chars: int = DEFAULT_MAX_STATUS_CHARS) -> str:
    """``text`` made safe for one ``STATUS=`` line: control characters become spaces,
    runs of white space collapse, and the result is cut to ``max_chars`` (ending in "...")."""
    flat = " ".join(text.translate(_CONTROL).split())
    if len(flat) <= max_chars:
        return flat
    if max_chars <= 3:
        return flat[:max_chars]
    return flat[: max_chars - 3].rstrip() + "..."


def _socket_address(raw: str) -> bytes | None:
    """The ``sendto`` address for ``$NOTIFY_SOCKET``, or None when it is not a Unix socket."""
    if raw.startswith("/"):
        return os.fsencode(raw)
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + os.fsencode(raw[1:])
    return None


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if the watchdog is meant for ``pid``."""
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            meant_for = int(raw_pid)
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a process id", raw_pid)
            return None
        if meant_for != pid:
            return None
    return usec / 2_000_000


class Notifier:
    """Reports service state to systemd over ``$NOTIFY_SOCKET``.

    ``env`` defaults to ``os.environ`` and ``pid`` to this process; both are read
    once, here. Methods return True when the datagram was handed to the socket,
    False when the notifier is disabled or sending failed. Safe to call from any
    thread.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        max_status_chars: int = DEFAULT_MAX_STATUS_CHARS,
    ) -> None:
        env = os.environ if env is None else env
        self._max_status_chars = max_status_chars
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False
        self.sent = 0
        self.errors = 0
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning(
                "NOTIFY_SOCKET=%r is not a Unix socket path or @abstract name;"
                " not reporting to systemd",
                raw,
            )
        self._interval = (
            _watchdog_interval(env, os.getpid() if pid is None else pid)
            if self._address is not None
            else None
        )

    @property
    def enabled(self) -> bool:
        """True when there is a socket to report to."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``), or None when the
        service has no watchdog, it is meant for another process, or the notifier is off."""
        return self._interval

    def ready(self, status: str = "") -> bool:
        """``READY=1``: start-up is complete (models loaded and warmed up, broker link set up)."""
        return self._send("READY=1", status)

    def status(self, text: str) -> bool:
        """``STATUS=...``: one line for ``systemctl status``."""
        return self._send(None, text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: still alive. Prefer :meth:`Watchdog.maybe_ping`, which checks health."""
        return self._send("WATCHDOG=1", "")

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1``: shutdown has begun (draining the outbox, closing the link)."""
        return self._send("STOPPING=1", status)

    def _send(self, state: str | None, status: str) -> bool:
        if self._address is None:
            return False
        lines = [state] if state else []
        if status:
            lines.append("STATUS=" + clean_status(status, self._max_status_chars))
        if not lines:
            return False
        payload = "\n".join(lines).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.setblocking(False)  # a full systemd queue must not stall the caller
                    self._sock = sock
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                self.errors += 1
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "cannot notify systemd at %r: %s; further failures are only counted",
                        os.fsdecode(self._address),
                        exc,
                    )
                else:
                    log.debug("cannot notify systemd: %s", exc)
                return False
            self.sent += 1
            return True

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Watchdog:
    """Sends ``WATCHDOG=1`` from the main loop, at most once per interval, only while healthy.

    ``checks`` are called, in order, each time a ping is due; a check that
    returns False or raises withholds the ping (counted in :attr:`skipped`) and
    the checks run again ``retry_fraction`` of an interval later. ``interval_s``
    overrides the notifier's interval (tests; never longer than systemd's).
    """

    def __init__(
        self,
        notifier: Notifier,
        checks: Iterable[HealthCheck] = (),
        *,
        clock: Clock = time.monotonic,
        interval_s: float | None = None,
        retry_fraction: float = DEFAULT_RETRY_FRACTION,
    ) -> None:
        if interval_s is not None and interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if not 0 < retry_fraction <= 1:
            raise ValueError(f"retry_fraction must be in (0, 1], got {retry_fraction}")
        self._notifier = notifier
        self._checks = list(checks)
        self._clock = clock
        self._interval = notifier.watchdog_interval_s if interval_s is None else interval_s
        self._retry_s = self._interval * retry_fraction if self._interval is not None else 0.0
        self._next_attempt: float | None = None
        self._unhealthy_logged = False
        self.last_ping: float | None = None
        """``clock()`` at the last ping that was sent, or None before the first."""
        self.pings = 0
        self.skipped = 0
        """Pings withheld because a health check failed."""

    @property
    def enabled(self) -> bool:
        """True when the service runs under a systemd watchdog (and pings go somewhere)."""
        return self._interval is not None and self._notifier.enabled

    def add_check(self, check: HealthCheck) -> None:
        """Add a health check (e.g. once a worker thread has started)."""
        self._checks.append(check)

    def seconds_until_due(self) -> float | None:
        """How long the main loop may block before it must call :meth:`maybe_ping` again;
        None when there is no watchdog."""
        if not self.enabled:
            return None
        if self._next_attempt is None:
            return 0.0
        return max(0.0, self._next_attempt - self._clock())

    def maybe_ping(self) -> bool:
        """Ping systemd if a ping is due and every health check passes; True if one was sent."""
        if not self.enabled or self._interval is None:
            return False
        now = self._clock()
        if self._next_attempt is not None and now < self._next_attempt:
            return False
        failed = self._first_failed_check()
        if failed is not None:
            self.skipped += 1
            self._next_attempt = now + self._retry_s
            if not self._unhealthy_logged:
                self._unhealthy_logged = True
                log.warning(
                    "health check %s failed: withholding the systemd watchdog ping"
                    " (systemd restarts the service if this lasts)",
                    failed,
                )
            return False
        if self._unhealthy_logged:
            self._unhealthy_logged = False
            log.warning("health checks pass again: resuming systemd watchdog pings")
        self._next_attempt = now + self._interval
        # Counted as a ping even if the send failed: the notifier counts that failure.
        self._notifier.watchdog()
        self.last_ping = now
        self.pings += 1
        return True

    def _first_failed_check(self) -> str | None:
        for check in self._checks:
            name = getattr(check, "__qualname__", None) or repr(check)
            try:
                ok = check()
            except Exception:
                log.exception("health check %s raised; treated as unhealthy", name)
                return name
            if not ok:
                return name
        return None


class Heartbeat:
    """A thread's sign of life, for use as a :class:`Watchdog` health check.

    The worker calls :meth:`beat` every time round its loop; ``fresh(max_age_s)``
    is a check that passes while the last beat is younger than ``max_age_s``.
    ``name`` names the check in the log. Assigning a float is atomic in CPython,
    so no lock is needed.
    """

    def __init__(self, name: str, clock: Clock = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age_s(self) -> float:
        return self._clock() - self._last

    def fresh(self, max_age_s: float) -> HealthCheck:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s}")

        def heartbeat_fresh() -> bool:
            return self.age_s() < max_age_s

        heartbeat_fresh.__qualname__ = f"{self.name} heartbeat (max age {max_age_s:g} s)"
        return heartbeat_fresh
