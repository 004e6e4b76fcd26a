"""`edge-agent run` as systemd runs it: notify socket, watchdog, SIGTERM; and its telemetry."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_agent.devtools.localbroker import Mosquitto, free_port
from tests.conftest import make_fake_pack, settings_env
from tests.integration.test_sources import Harness
from tests.mqtt_peer import Collector
from tests.prometheus import check_metrics

pytestmark = pytest.mark.integration


def test_ready_watchdog_and_clean_sigterm(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(10)
    port = free_port()
    pack = make_fake_pack(tmp_path / "pack")
    env = dict(os.environ)
    env.update(
        settings_env(
            broker.port,
            topic_prefix,
            tmp_path / "state",
            model_pack=str(pack),
            source_kind="udp",
            source_path=f"127.0.0.1:{port}",
            router_cooldown_s="0",
            router_max_urgent_per_minute="100000",
        )
    )
    env.update({"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "300000"})
    collector = Collector(broker.port, topic_prefix)
    accepted: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--decisions"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                obj = json.loads(line)
                if "accepted" in obj:
                    accepted.append(obj["accepted"])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        messages = [notify.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        assert "STATUS=" in messages[0]
        while sum(m.startswith("WATCHDOG=1") for m in messages) < 3:
            messages.append(notify.recv(4096).decode())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(200):
                conf = 0.3 if i % 2 else 0.95  # every other reading is an urgent hard case
                line = json.dumps({"id": i, "values": [[0, conf, 0, 0], [0, 0, 0, 0]]})
                s.sendto(line.encode(), ("127.0.0.1", port))
        deadline = time.monotonic() + 10
        while len(accepted) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        reader.join(5)
    while not messages[-1].startswith("STOPPING=1"):
        messages.append(notify.recv(4096).decode())
    notify.close()
    assert len(accepted) == 100
    # Nothing accepted is lost: each key was delivered or is still in the outbox.
    db = sqlite3.connect(tmp_path / "state" / "outbox.db")
    stored = {k for (k,) in db.execute("SELECT key FROM messages WHERE cls < 2")}
    db.close()
    collector.wait_for(set(accepted) - stored, 10)
    assert set(accepted) <= set(collector.keys) | stored
    collector.close()


def test_telemetry_payload_textfile_and_metrics_endpoint(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    textfile = tmp_path / "edge_agent.prom"
    port = free_port()
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b"\n".join(
            json.dumps(
                {"id": i, "values": [[0, 0.3 if i % 4 == 0 else 0.95, 0, 0], [0, 0, 0, 0]]}
            ).encode()
            for i in range(40)
        )
        + b"\n{bad\n"
    )
    collector = Collector(broker.port, topic_prefix, extra_topics=(f"{topic_prefix}/+/telemetry",))
    h = Harness(
        broker,
        topic_prefix,
        tmp_path,
        source_kind="jsonl",
        source_path=str(path),
        telemetry_interval_s="0.2",
        telemetry_textfile=str(textfile),
        telemetry_http_port=str(port),
    )
    seen = threading.Event()

    def telemetry() -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in list(collector.messages) if t.endswith("/telemetry")]

    # The input ends at once; the agent stays up (endpoint, telemetry) until the test has read
    # the endpoint and a telemetry message that counts every line, then drains.
    h.agent.drain = lambda timeout_s: seen.wait(10)  # type: ignore[method-assign]
    h.thread.start()
    body = ""
    deadline = time.monotonic() + 10
    while "edge_agent_readings_total 40" not in body and time.monotonic() < deadline:
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            body = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:  # not listening yet
            time.sleep(0.02)
    while not any(m["readings"] == 40 for m in telemetry()) and time.monotonic() < deadline:
        time.sleep(0.02)
    seen.set()
    h.thread.join(30)
    assert h.code == 0
    assert "edge_agent_process_resident_memory_bytes " in body
    assert "edge_agent_readings_total 40" in body
    checked = check_metrics(body)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
    published = telemetry()
    assert published, "no telemetry published"
    last = published[-1]
    assert last["v"] == 1
    assert last["device"] == "dev1"
    assert last["readings"] == 40
    assert last["rejects"] == {"malformed_json": 1}
    assert last["hard_urgent"] + last["hard_batch"] == 10
    assert last["rss_bytes"] > 10_000_000
    assert 0 < last["latency_ms_p50"] <= last["latency_ms_p99"]
    assert set(last["outbox"]) == {"urgent", "batch", "telemetry"}
    text = textfile.read_text()
    checked = check_metrics(text)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
    lines = set(text.splitlines())
    assert "edge_agent_readings_total 40" in lines
    assert 'edge_agent_readings_rejected_total{reason="malformed_json"} 1' in lines
    assert 'edge_agent_info{device="dev1",model="fake-pack@0.0.1"} 1' in lines
    assert "edge_agent_decision_latency_seconds_count 40" in lines
    assert any(x.startswith('edge_agent_outbox_messages{class="urgent"}') for x in lines)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        float(value)
        assert name.startswith("edge_agent_")
    collector.close()
