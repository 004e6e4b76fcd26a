"""The agent as a process, measured from outside: cold start to READY=1 and to the first
decision, peak RSS and CPU time per reading, and ``edge-agent score``'s round trip per line."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from edge_agent.devtools.measure import load_lines, stats
from edge_agent.models.pack import ModelPack


class _PeakRss:
    """Samples a child's VmHWM (peak RSS of its own image, after exec) until it exits.

    ``ru_maxrss`` from wait4 is not used: on Linux it also counts the pages of the
    forked copy of this (large) benchmark process from before the exec.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(1)
        return self.peak


def _edge_agent_cmd() -> list[str]:
    return [sys.executable, "-m", "edge_agent"]


def _piped(
    args: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]]:
    """``edge-agent ARGS`` as a child process with pipes to its stdin and from its stdout."""
    proc = subprocess.Popen(
        [*_edge_agent_cmd(), *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    if proc.stdin is None or proc.stdout is None:  # pragma: no cover - PIPE above
        raise RuntimeError("no pipes to the edge-agent process")
    return proc, proc.stdin, proc.stdout


def cold_start(pack: ModelPack, state: Path, port: int, line: bytes, runs: int) -> dict[str, Any]:
    """``edge-agent run``: process start → READY=1 and → first decision, peak RSS, CPU."""
    ready, first, rss, cpu = [], [], [], []
    for i in range(runs):
        sock_path = state / f"notify{i}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(sock_path))
        notify.settimeout(30)
        env = dict(os.environ)
        env.update(
            {
                "NOTIFY_SOCKET": str(sock_path),
                "EDGE_AGENT_MODEL_PACK": str(pack.path),
                "EDGE_AGENT_DEVICE_STATE_DIR": str(state / f"cold{i}"),
                "EDGE_AGENT_MQTT_PORT": str(port),
                "EDGE_AGENT_MQTT_TOPIC_PREFIX": "bench/cold",
                "EDGE_AGENT_DEVICE_ID": "bench-cold",
            }
        )
        t0 = time.perf_counter()
        proc, stdin, stdout = _piped(
            ["run", "--decisions", "--exit-when-drained", "--drain-timeout", "5"], env
        )
        sampler = _PeakRss(proc.pid)
        msg = notify.recv(4096)
        ready.append(time.perf_counter() - t0 if msg.startswith(b"READY=1") else float("nan"))
        stdin.write(line + b"\n")
        stdin.flush()
        stdout.readline()
        first.append(time.perf_counter() - t0)
        sampler.sample()  # one last sample while the process is alive
        stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.close()
        notify.close()
        rss.append(sampler.stop())
        cpu.append(usage.ru_utime + usage.ru_stime)
    return {
        "ready_s": float(np.median(ready)),
        "first_decision_s": float(np.median(first)),
        "runs": runs,
        "peak_rss_bytes": int(max(rss)),
        "process_cpu_s": float(np.median(cpu)),
    }


def score_round_trip(
    pack: ModelPack, lines: list[bytes], n: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``edge-agent score`` as a child process, one line at a time, timed from outside.

    Each round trip is one line written to its stdin until its decision line is read from its
    stdout: decoding, validation, scoring and encoding included, start-up not. Also the child's
    peak RSS. ``env`` adds to the environment (e.g. ``LLAMA_CPP_LIB_PATH``, another build).
    """
    proc, stdin, stdout = _piped(
        ["score", "--model", str(pack.path), "-q", "-"], {**os.environ, **(env or {})}
    )
    sampler = _PeakRss(proc.pid)
    samples: list[float] = []
    try:
        for i in range(n + 1):
            t0 = time.perf_counter_ns()
            stdin.write(lines[i % len(lines)] + b"\n")
            stdin.flush()
            if not stdout.readline():
                raise RuntimeError(f"edge-agent score --model {pack.ref} ended early")
            if i:  # the first line waits for the model to load
                samples.append((time.perf_counter_ns() - t0) / 1e6)
        sampler.sample()
    finally:
        stdin.close()
        proc.wait(60)
        stdout.close()
    return stats(samples) | {"peak_rss_bytes": sampler.stop()}


def agent_process(
    pack: ModelPack, data: Path, state: Path, port: int, loops: int
) -> dict[str, Any]:
    """A whole ``edge-agent run`` over the replayed test data: peak RSS and CPU per reading."""
    n_lines = len(load_lines(data))
    env = dict(os.environ)
    env.update(
        {
            "EDGE_AGENT_MODEL_PACK": str(pack.path),
            "EDGE_AGENT_DEVICE_STATE_DIR": str(state / "proc"),
            "EDGE_AGENT_MQTT_PORT": str(port),
            "EDGE_AGENT_MQTT_TOPIC_PREFIX": "bench/proc",
            "EDGE_AGENT_DEVICE_ID": "bench-proc",
            "EDGE_AGENT_SOURCE_KIND": "replay",
            "EDGE_AGENT_SOURCE_PATH": str(data),
            "EDGE_AGENT_SOURCE_LOOPS": str(loops),
        }
    )
    proc = subprocess.Popen(
        [*_edge_agent_cmd(), "run", "--exit-when-drained", "--drain-timeout", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sampler = _PeakRss(proc.pid)
    _, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    readings = n_lines * loops
    return {
        "readings": readings,
        "peak_rss_bytes": sampler.stop(),
        "cpu_ms_per_reading_incl_startup": (usage.ru_utime + usage.ru_stime) * 1000 / readings,
    }
