"""What the cloud worker asks of the broker when it connects."""

from __future__ import annotations

import socket

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import load_settings


def test_the_worker_announces_its_receive_maximum_on_connect() -> None:
    """MQTT v5 CONNECT property 0x21 (Receive Maximum), two bytes: the broker may hand the
    worker at most that many unacknowledged hard-case messages (cloud.receive_maximum)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    env = {
        "EDGE_AGENT_MQTT_PORT": str(server.getsockname()[1]),
        "EDGE_AGENT_CLOUD_RECEIVE_MAXIMUM": "7",
        "EDGE_AGENT_CLOUD_WORKER_ID": "rm",
    }
    worker = CloudWorker(load_settings(None, env=env))  # opens the default cloud pack
    worker.start()
    try:
        conn, _ = server.accept()
        conn.settimeout(10)
        packet = conn.recv(4096)
        conn.close()
    finally:
        worker.stop(timeout=5)
        server.close()
    assert packet[0] == 0x10  # CONNECT
    assert b"\x21\x00\x07" in packet
