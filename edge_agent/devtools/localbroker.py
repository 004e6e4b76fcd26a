"""A local Eclipse Mosquitto broker for the demo, the benchmark and the tests.

It runs in the foreground with a generated config on a free loopback port,
logging to a file in its own folder, and is stopped by its PID. Started as
root, mosquitto switches to the ``mosquitto`` user, so the folder and config
are made readable and there is no pid file or persistence file to write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from edge_agent.errors import BrokerError

INSTALL_HINT = "install it with: sudo apt-get install -y mosquitto"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's range of ephemeral
    ports. A client connection is never given such a port as its own, as it can be an ephemeral
    one: a client reconnecting to a port where nothing listens yet (a broker being restarted)
    could otherwise connect to itself, and hold the port the server then cannot bind."""
    first_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    low = max(1024, first_ephemeral - 12000)
    for _ in range(200):
        port = low + secrets.randbelow(max(1, first_ephemeral - low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: any free one
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str:
    """The mosquitto executable, or BrokerError saying how to install it."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(f"mosquitto (Eclipse Mosquitto 2.x) is not installed; {INSTALL_HINT}")


class Mosquitto:
    """One broker process. ``extra`` lines are appended to the generated config."""

    def __init__(
        self, workdir: Path, port: int | None = None, extra: str = "", anonymous: bool = True
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.anonymous = anonymous
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        """Start (or restart, on the same port) and wait until it accepts connections."""
        exe = mosquitto_path()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 0\n"
            # Deliver to subscribers at once instead of holding all but 20 in broker memory,
            # where a broker crash loses what it has already acknowledged to the publisher.
            "max_inflight_messages 0\n"
            # Without it Nagle's algorithm meets delayed ACKs and each round trip costs ~40 ms.
            "set_tcp_nodelay true\n"
            f"{self.extra}\n"
        )
        # mosquitto started as root drops to its own user, which must still read the config.
        os.chmod(self.workdir, 0o755)  # noqa: S103
        os.chmod(self.conf, 0o644)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise BrokerError(f"mosquitto exited at start (port {self.port}): {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout_s} s")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BrokerError("the broker was not started")
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
