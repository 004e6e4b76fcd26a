"""`edge-agent fleet-sim` in small: simulated devices, each its own MQTT session, against two
real cloud workers, with a worker SIGKILLed and the broker restarted in the same run. Every
case gets a verdict and the shared ledger charges each once. (The 1,000-device runs and the
scaling table are in docs/fleet.md; they take minutes, too long for the suite.)"""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.cloud.verdicts import WORKER_PROPERTY
from edge_agent.cloud.worker import CloudWorker
from edge_agent.devtools.bridge import site_bridge_conf
from edge_agent.devtools.fleet import FleetOptions
from edge_agent.devtools.fleetrun import Faults, load_windows, run_fleet
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.errors import ConfigError
from edge_agent.wire.messages import BatchVerdicts, Verdict
from tests.conftest import TEST_JSONL
from tests.integration.test_cloud import (
    CLOUD_PACK,
    Devices,
    PackUnderTest,
    cloud_settings,
    hard_case,
    running,
)

pytestmark = pytest.mark.integration


def test_a_small_fleet_survives_a_worker_kill_and_a_broker_restart() -> None:
    opts = FleetOptions(
        devices=60,
        duration_s=16.0,
        case_rate=0.5,
        batch_wait_s=2.0,
        burst_every_s=5.0,
        resend_s=5.0,
        reconnect_max_s=2.0,
        windows=load_windows(TEST_JSONL),
        seed=7,
    )
    report = run_fleet(opts, 2, Faults(kill_worker_at_s=4.0, restart_broker_at_s=9.0), False)
    print("\n", report)
    assert set(report["events"]) == {"worker_kill", "broker_restart"}
    assert report["cases"] > 300
    assert report["missing"] == 0
    assert report["charged_once"], report["ledger"]
    assert report["ledger"]["devices"] == 60
    # The broker restart cut every device off; each came back (jittered, at most
    # reconnect_max_s after its last failed attempt).
    assert report["disconnects"] >= 60
    assert report["reconnect_s_max"] is not None
    assert report["worker_exit_codes"] == {"w1": 0, "w2": 0}
    assert report["latency"]["urgent"]["verdicts"] == report["cases_urgent"]


def test_a_site_broker_bridged_upstream_carries_cases_and_verdicts(tmp_path: Path) -> None:
    """Devices on a site's mosquitto, the cloud worker on the fleet's: the generated bridge
    carries a hard case up and its verdict down with the MQTT v5 properties intact."""
    prefix = "edge"
    upstream = Mosquitto(tmp_path / "upstream").start()
    conf = site_bridge_conf("plant-7", f"127.0.0.1:{upstream.port}", prefix)
    # A bounded in-flight window on the site broker (see edge_agent/devtools/bridge.py).
    site = Mosquitto(tmp_path / "site", extra="max_inflight_messages 20\n" + conf).start()
    pack = PackUnderTest(CLOUD_PACK, load_windows(TEST_JSONL, 4), [], "cloud")
    worker = CloudWorker(cloud_settings(upstream.port, prefix, pack))
    devices = None
    try:
        assert wait_for_retained(site.port, f"{prefix}/site/plant-7/bridge", b"1")
        devices = Devices(site.port, prefix)
        with running(worker):
            case = hard_case("dev-9", 1, pack.windows[0])
            devices.send_urgent(case)
            got = devices.receive(timeout=20)
            devices.send_batch("dev-9", [hard_case("dev-9", 2, pack.windows[1], tier="batch")])
            batch = devices.receive(timeout=20)
    finally:
        if devices is not None:
            devices.close()
        site.stop()
        upstream.stop()
    verdict = msgspec.json.decode(got.payload, type=Verdict)
    assert (verdict.key, verdict.tier) == ("dev-9:1", "urgent")
    assert got.correlation == b"dev-9:1"  # CorrelationData crossed the bridge both ways
    assert got.user[WORKER_PROPERTY] == "w1"
    assert [v.key for v in msgspec.json.decode(batch.payload, type=BatchVerdicts).verdicts] == [
        "dev-9:2"
    ]


def wait_for_retained(port: int, topic: str, payload: bytes, timeout: float = 20.0) -> bool:
    seen = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    client.on_message = lambda _c, _u, m: seen.set() if m.payload == payload else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        return seen.wait(timeout)
    finally:
        client.loop_stop()
        client.disconnect()


def test_bridge_configuration_refuses_what_it_cannot_use() -> None:
    with pytest.raises(ConfigError, match="site name"):
        site_bridge_conf("a b", "host:1883")
    with pytest.raises(ConfigError, match="host:port"):
        site_bridge_conf("a", "host")
    with pytest.raises(ConfigError, match="prefix"):
        site_bridge_conf("a", "host:1883", "edge/#")
