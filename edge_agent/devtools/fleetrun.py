"""One fleet run: a local mosquitto, ``workers`` ``edge-agent cloud`` processes in one shared
group, the simulated devices of ``fleet.py``, optional faults (a worker SIGKILLed and started
again, the broker restarted), and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.cloud.ledger_store import summary_of
from edge_agent.devtools.fleet import Fleet, FleetOptions, cpu_seconds, latency_report
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.errors import EdgeAgentError
from edge_agent.wire.messages import Topics, WorkerStatus

#: Longest wait for a worker's retained ``online`` status after it was started.
WORKER_READY_S = 60.0


@dataclass
class Faults:
    #: Seconds into the run at which worker ``w1`` is SIGKILLed (and started again 1 s later).
    kill_worker_at_s: float | None = None
    #: Seconds into the run at which the broker is SIGKILLed, and started again on its port
    #: ``broker_down_s`` later.
    restart_broker_at_s: float | None = None
    broker_down_s: float = 0.0


def load_windows(data: Path, limit: int = 200) -> list[list[list[float]]]:
    windows = []
    with data.open() as fh:
        for line in fh:
            if line.strip():
                windows.append(json.loads(line)["values"])
            if len(windows) >= limit:
                break
    if not windows:
        raise EdgeAgentError(f"{data}: no readings to send")
    return windows


class Workers:
    """``edge-agent cloud`` processes w1..wN, in one group, sharing one ledger file (one
    host): a case is charged, and scored, once whichever of them answers it."""

    def __init__(self, n: int, port: int, prefix: str, folder: Path, extra: dict[str, str]) -> None:
        self.folder = folder
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        self.env.update(
            {
                "EDGE_AGENT_MQTT_PORT": str(port),
                "EDGE_AGENT_MQTT_TOPIC_PREFIX": prefix,
                "EDGE_AGENT_CLOUD_GROUP": "fleet",
                "EDGE_AGENT_LINK_RECONNECT_MIN_S": "0.2",
                "EDGE_AGENT_LINK_RECONNECT_MAX_S": "5",
                **extra,
            }
        )
        self.names = [f"w{i + 1}" for i in range(n)]
        self.ledger = folder / "ledger.db"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.cpu_before: dict[str, float] = {}

    def start(self, name: str) -> None:
        env = {
            **self.env,
            "EDGE_AGENT_CLOUD_WORKER_ID": name,
            "EDGE_AGENT_CLOUD_LEDGER_PATH": str(self.ledger),
        }
        with (self.folder / f"{name}.log").open("ab") as err:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "--log-level", "WARNING", "cloud"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        self.cpu_before[name] = self.cpu_before.get(name, 0.0) + cpu_seconds(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def cpu(self) -> dict[str, float]:
        return {n: self.cpu_before.get(n, 0.0) + cpu_seconds(p.pid) for n, p in self.procs.items()}

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[name] = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = None
        return codes


def wait_online(port: int, prefix: str, names: list[str]) -> None:
    """Until every worker's retained status says ``online`` (raises EdgeAgentError)."""
    online: set[str] = set()
    topic = Topics(prefix).worker_status("+")
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            status = msgspec.json.decode(msg.payload, type=WorkerStatus)
            if status.state == "online":
                online.add(status.worker)

    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        deadline = time.monotonic() + WORKER_READY_S
        while not online >= set(names):
            if time.monotonic() > deadline:
                raise EdgeAgentError(f"cloud workers not online: {sorted(set(names) - online)}")
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()


def run_fleet(
    opts: FleetOptions, workers: int, faults: Faults, progress: bool = True
) -> dict[str, Any]:
    """A whole run; returns the report (JSON-able)."""
    with tempfile.TemporaryDirectory(prefix="edge-fleet-") as tmp:
        folder = Path(tmp)
        broker = Mosquitto(folder / "broker").start()
        opts.port = broker.port
        pool = Workers(workers, broker.port, opts.prefix, folder, {})
        fleet = Fleet(opts)
        try:
            for name in pool.names:
                pool.start(name)
            try:
                wait_online(broker.port, opts.prefix, pool.names)
            except EdgeAgentError as exc:
                logs = {n: (folder / f"{n}.log").read_text()[-1500:] for n in pool.names}
                raise EdgeAgentError(f"{exc}; worker logs: {logs}") from None
            fleet.start()
            report = _Run(fleet, pool, broker, opts).drive(faults, progress)
            report["worker_exit_codes"] = pool.stop()
            total = summary_of(pool.ledger)["total"]
            report["ledger"] = {k: total[k] for k in ("urgent", "batch", "spend", "devices")}
            # Every case answered, and charged once: the ledger counts what the devices sent.
            report["charged_once"] = (
                report["missing"] == 0 and total["urgent"] + total["batch"] == report["cases"]
            )
            return report
        finally:
            pool.stop()
            fleet.close()
            broker.stop()


#: Upper bounds (seconds) of the reconnect-time histogram's buckets.
RECONNECT_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def _histogram(values: list[float]) -> dict[str, int]:
    """How many devices were back within each bucket (``<=0.25``, ..., ``>64``)."""
    out = {f"<={b:g}": 0 for b in RECONNECT_BUCKETS_S}
    out[f">{RECONNECT_BUCKETS_S[-1]:g}"] = 0
    for v in values:
        label = next((f"<={b:g}" for b in RECONNECT_BUCKETS_S if v <= b), None)
        out[label or f">{RECONNECT_BUCKETS_S[-1]:g}"] += 1
    return out


@dataclass
class _Run:
    fleet: Fleet
    pool: Workers
    broker: Mosquitto
    opts: FleetOptions

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: dict[str, float] = {}
        self.broker_cpu_s = -cpu_seconds(self.broker.pid)
        self.sim_cpu0 = time.process_time()

    def kill_worker(self) -> None:
        self.pool.kill("w1")
        self.events["worker_kill"] = time.monotonic() - self.t0

    def kill_broker(self) -> None:
        self.broker_cpu_s += cpu_seconds(self.broker.pid)
        self.broker.kill()
        self.events["broker_killed"] = time.monotonic() - self.t0

    def start_broker(self) -> None:
        self.broker.start()
        self.events["broker_started"] = time.monotonic() - self.t0
        self.broker_cpu_s -= cpu_seconds(self.broker.pid)

    def drive(self, faults: Faults, progress: bool) -> dict[str, Any]:
        fleet, opts = self.fleet, self.opts
        hooks: dict[float, Any] = {}
        if faults.kill_worker_at_s is not None:
            hooks[faults.kill_worker_at_s] = self.kill_worker
            hooks[faults.kill_worker_at_s + 1.0] = lambda: self.pool.start("w1")
        if faults.restart_broker_at_s is not None:
            hooks[faults.restart_broker_at_s] = self.kill_broker
            hooks[faults.restart_broker_at_s + faults.broker_down_s + 1e-3] = self.start_broker
        step, elapsed = 10.0, 0.0
        while elapsed < opts.duration_s:
            chunk = min(step, opts.duration_s - elapsed)
            due = {t - elapsed: h for t, h in hooks.items() if elapsed <= t < elapsed + chunk}
            fleet.run_for(chunk, new_cases=True, hooks=due)
            elapsed += chunk
            if progress:
                sys.stderr.write(
                    f"\rfleet: {elapsed:5.0f}/{opts.duration_s:.0f} s, {fleet.online()} online,"
                    f" {fleet.verdicts()} verdicts, {fleet.missing()} waiting   "
                )
        run_s = time.monotonic() - self.t0
        verdicts_in_run = fleet.verdicts()
        drain_end = time.monotonic() + opts.drain_s
        while fleet.missing() and time.monotonic() < drain_end:
            fleet.run_for(1.0, new_cases=False)
        if progress:
            sys.stderr.write("\n")
        self.broker_cpu_s += cpu_seconds(self.broker.pid)
        return self.report(run_s, verdicts_in_run)

    def report(self, run_s: float, verdicts_in_run: int) -> dict[str, Any]:
        fleet, c = self.fleet, self.fleet.counters
        cpu = self.pool.cpu()
        verdicts = fleet.verdicts()
        # Time to come back: from the broker's return when it was restarted, else from the
        # device's loss of its connection.
        back = self.t0 + self.events.get("broker_started", -self.t0)
        reconnected = [
            fleet.connected_at[d] - max(fleet.disconnected_at[d], back)
            for d in fleet.disconnected_at
            if fleet.connected_at.get(d, 0) > fleet.disconnected_at[d]
        ]
        return {
            "devices": self.opts.devices,
            "workers": len(self.pool.names),
            "duration_s": round(run_s, 1),
            "cases": c["cases_urgent"] + c["cases_batch"],
            "cases_urgent": c["cases_urgent"],
            "cases_batch": c["cases_batch"],
            "verdicts_per_s": round(verdicts_in_run / run_s, 1),
            "latency": latency_report(fleet),
            "missing": fleet.missing(),
            "duplicate_verdicts": c["duplicate_verdicts"],
            "resent": c["resent"],
            "disconnects": c["disconnects"],
            "reconnect_s_max": round(max(reconnected), 2) if reconnected else None,
            "reconnect_s_histogram": _histogram(reconnected),
            "cpu_s": {
                "broker": round(self.broker_cpu_s, 2),
                "simulator": round(time.process_time() - self.sim_cpu0, 2),
                **{k: round(v, 2) for k, v in cpu.items()},
            },
            "worker_cpu_ms_per_verdict": round(1000 * sum(cpu.values()) / max(1, verdicts), 3),
            "events": {k: round(v, 2) for k, v in self.events.items()},
        }
