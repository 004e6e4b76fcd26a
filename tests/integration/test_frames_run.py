"""Binary frames through a real ``edge-agent run`` (default ONNX pack, real broker, real sockets).

The done-when of issue 17: a BasicMotions test window sent as a frame over UDP and over a Unix
datagram socket is decided with the same label, confidence (to 1e-6) and route as the same
window sent as JSON; hostile frames are rejected and counted (summary and Prometheus textfile).
And the producer examples of docs/frames.md, taken from the page: the Python one is run, the C
one compiled with the system compiler, each against a running agent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.devtools.localbroker import Mosquitto, free_port
from edge_agent.models.pack import BUNDLED_TEST_DATA
from edge_agent.wire.frames import encode_frame
from tests.conftest import puback_env

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "frames.md"
MAX_FRAME = 8192
WINDOWS = [json.loads(x) for x in BUNDLED_TEST_DATA.read_bytes().splitlines() if x.strip()]
#: The test windows as a sensor with a gain error sends them: hard cases (out of range, low
#: confidence) beside the local answers of the windows themselves.
SENT = [
    *({"id": w["id"], "values": w["values"]} for w in WINDOWS),
    *({"id": f"{w['id']}-gain", "values": (np.asarray(w["values"]) * 4).tolist()} for w in WINDOWS),
]
#: Hostile frames sent along with the windows, and the counts they must leave.
NAN = np.zeros((6, 100), np.float32)
NAN[2, 50] = np.nan
HOSTILE = [
    encode_frame(NAN, id="nan"),
    b"EAFX" + encode_frame(np.zeros((6, 100)))[4:],  # wrong magic
    encode_frame(np.zeros((6, 100)), id="cut")[:-100],  # truncated
    encode_frame(np.zeros((6, 100)), id="big") + bytes(MAX_FRAME),  # over the size limit
    encode_frame(np.zeros((100, 6))),  # wrong shape
]
HOSTILE_COUNTS = {"non_finite": 1, "bad_frame": 2, "too_large": 1, "wrong_shape": 1}


def doc_block(name: str) -> str:
    """The code block of docs/frames.md marked ``<!-- tested: name -->``."""
    pattern = rf"<!-- tested: {re.escape(name)} -->\n```\w+\n(.*?)```"
    found = re.search(pattern, DOC.read_text(), re.DOTALL)
    assert found, f"docs/frames.md has no block marked {name}"
    return found.group(1)


class RunningAgent:
    """``edge-agent run --decisions`` in a subprocess; its decision lines collected."""

    def __init__(self, proc: subprocess.Popen[bytes], address: str, kind: str) -> None:
        self.proc = proc
        self.address = address
        self.kind = kind
        self.lines: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            obj = json.loads(line)
            if "label" in obj or "error" in obj:
                self.lines.append(obj)

    def send(self, datagrams: list[bytes]) -> None:
        family = socket.AF_INET if self.kind == "udp" else socket.AF_UNIX
        host, _, port = self.address.rpartition(":")
        target: Any = (host, int(port)) if self.kind == "udp" else self.address
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            for datagram in datagrams:
                s.sendto(datagram, target)
                time.sleep(0.001)  # a sensor's pace; loopback would not lose them anyway

    def wait_for(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.lines)


@contextmanager
def agent(broker: Mosquitto, prefix: str, tmp: Path, kind: str, fmt: str) -> Iterator[RunningAgent]:
    """An agent on the default pack reading ``kind`` datagrams in format ``fmt``; stopped with
    SIGTERM at the end, which it must survive with exit code 0."""
    tmp.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}" if kind == "udp" else str(tmp / "in.sock")
    notify_path = tmp / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    env = dict(os.environ)
    env.update(
        puback_env(
            broker.port,
            prefix,
            tmp / "state",
            source_kind=kind,
            source_path=address,
            source_format=fmt,
            input_max_frame_bytes=str(MAX_FRAME),
            # The route must not depend on timing: no cooldown, no urgent budget in the way.
            router_cooldown_s="0",
            router_max_urgent_per_minute="100000",
            telemetry_interval_s="0.2",
            telemetry_textfile=str(tmp / "edge_agent.prom"),
        )
    )
    env["NOTIFY_SOCKET"] = str(notify_path)
    cmd = [sys.executable, "-m", "edge_agent", "run", "--decisions"]
    cmd += ["--summary-json", str(tmp / "summary.json")]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            while not notify.recv(4096).startswith(b"READY=1"):
                pass
            yield RunningAgent(proc, address, kind)
        finally:
            notify.close()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err.decode()[-2000:]


def by_id(lines: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {x["id"]: x for x in lines if "label" in x}


def assert_same_decisions(got: dict[Any, Any], expected: dict[Any, Any]) -> None:
    assert set(got) == set(expected)
    for rid, want in expected.items():
        have = got[rid]
        assert (have["label"], have["route"], have["reason"]) == (
            want["label"],
            want["route"],
            want["reason"],
        ), rid
        assert abs(have["confidence"] - want["confidence"]) <= 1e-6, rid
        assert have["model"] == want["model"]


def wait_for_file_line(path: Path, line: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path.name} never had {line!r}")


@pytest.mark.parametrize("kind", ["udp", "unix"])
def test_a_window_as_a_frame_is_decided_as_the_same_window_as_json(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path, kind: str
) -> None:
    with agent(broker, topic_prefix, tmp_path / "json", kind, "jsonl") as a:
        a.send([json.dumps(w).encode() for w in SENT])
        expected = by_id(a.wait_for(len(SENT)))
    assert len(expected) == len(SENT)
    reasons = {x["reason"] for x in expected.values() if x["route"] == "hard"}
    assert {"out_of_range", "low_confidence"} <= reasons  # hard cases among the local ones

    frames = [encode_frame(w["values"], id=w["id"]) for w in SENT]
    with agent(broker, topic_prefix, tmp_path / "frames", kind, "frames") as a:
        a.send([*frames, *HOSTILE])
        got = a.wait_for(len(SENT) + len(HOSTILE))
        for code, n in HOSTILE_COUNTS.items():
            wait_for_file_line(
                tmp_path / "frames" / "edge_agent.prom",
                f'edge_agent_readings_rejected_total{{reason="{code}"}} {n}',
            )
    assert_same_decisions(by_id(got), expected)
    errors = sorted(x["error"]["code"] for x in got if "error" in x)
    assert errors == sorted(c for c, n in HOSTILE_COUNTS.items() for _ in range(n))
    summary = json.loads((tmp_path / "frames" / "summary.json").read_text())
    assert summary["rejects"] == HOSTILE_COUNTS
    assert summary["readings"] == len(SENT)


def reference(window: dict[str, Any]) -> dict[str, Any]:
    """What ``edge-agent score`` says about the window as a JSON line."""
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "score", "-q"],
        input=json.dumps(window).encode() + b"\n",
        capture_output=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


def test_python_producer_of_the_docs_sends_a_frame_over_udp(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    script = tmp_path / "producer.py"
    script.write_text(doc_block("producer.py"))
    window = WINDOWS[7]
    text = "\n".join(" ".join(repr(v) for v in channel) for channel in window["values"]) + "\n"
    with agent(broker, topic_prefix, tmp_path / "agent", "udp", "frames") as a:
        subprocess.run(
            [sys.executable, str(script), a.address], input=text.encode(), check=True, timeout=30
        )
        got = a.wait_for(1)
    assert [x.get("id") for x in got] == ["imu-1"]
    assert_same_decisions({"w": got[0]}, {"w": reference(window)})


def test_c_producer_of_the_docs_compiles_and_sends_a_frame_over_a_unix_socket(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "no C compiler: scripts/setup --dev installs gcc"
    source = tmp_path / "producer.c"
    source.write_text(doc_block("producer.c"))
    binary = tmp_path / "producer"
    built = subprocess.run(
        [compiler, "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    window = WINDOWS[23]
    raw = np.asarray(window["values"], dtype="<f4").tobytes()
    assert len(raw) == 2400
    with agent(broker, topic_prefix, tmp_path / "agent", "unix", "frames") as a:
        subprocess.run([str(binary), a.address], input=raw, check=True, timeout=30)
        short = subprocess.run([str(binary), a.address], input=raw[:-1], timeout=30, check=False)
        got = a.wait_for(1)
    assert short.returncode == 2  # it refuses to send a short window
    assert [x.get("id") for x in got] == ["imu-2"]
    assert_same_decisions({"w": got[0]}, {"w": reference(window)})
