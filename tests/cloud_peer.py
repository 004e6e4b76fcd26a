"""`edge-agent cloud` as a real process for tests, and what tells when it is ready: its
retained status on the broker and its messages to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.wire.messages import Topics, WorkerStatus

TIMEOUT = 30.0


class StatusWatcher:
    """Subscribes to every worker's retained status under a prefix; keeps the last per worker."""

    def __init__(self, port: int, prefix: str) -> None:
        self.topic = Topics(prefix).worker_status("+")
        self.last: dict[str, WorkerStatus] = {}
        self.changed = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"status-watcher-{os.getpid()}-{id(self)}",
            protocol=mqtt.MQTTv5,
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("status watcher could not subscribe")

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        status = msgspec.json.decode(msg.payload, type=WorkerStatus)
        with self.changed:
            self.last[status.worker] = status
            self.changed.notify_all()

    def wait_for(self, worker: str, state: str, timeout: float = TIMEOUT) -> bool:
        """Until ``worker``'s last status is ``state``; False on timeout."""
        with self.changed:
            return self.changed.wait_for(
                lambda: worker in self.last and self.last[worker].state == state, timeout
            )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET: what a service tells systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.splitlines() for m in self.messages):
                return True
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return any(line in m.splitlines() for m in self.messages)

    def close(self) -> None:
        self.sock.close()


class WorkerProcess:
    """``python -m edge_agent cloud`` with settings from the environment; stderr to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "--log-level", "INFO", "cloud"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def worker_env(
    port: int, prefix: str, pack: Path, ledger: str | Path, worker: str, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(
        {
            "EDGE_AGENT_MQTT_PORT": str(port),
            "EDGE_AGENT_MQTT_TOPIC_PREFIX": prefix,
            "EDGE_AGENT_MQTT_KEEPALIVE_S": "5",
            "EDGE_AGENT_CLOUD_PACK": str(pack),
            "EDGE_AGENT_CLOUD_GROUP": "pool",
            "EDGE_AGENT_CLOUD_WORKER_ID": worker,
            "EDGE_AGENT_CLOUD_LEDGER_PATH": str(ledger),
            "EDGE_AGENT_LINK_RECONNECT_MIN_S": "0.05",
            "EDGE_AGENT_LINK_RECONNECT_MAX_S": "0.3",
        }
    )
    env.update({f"EDGE_AGENT_{k.upper()}": v for k, v in extra.items()})
    return env


def drain(q: queue.Queue[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
