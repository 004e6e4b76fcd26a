"""`edge-agent fleet-sim` in small: simulated devices, each its own MQTT session, against two
real cloud workers, with a worker SIGKILLed and the broker restarted in the same run. Every
case gets a verdict and the shared ledger charges each once. (The 1,000-device runs and the
scaling table are in docs/fleet.md; they take minutes, too long for the suite.)"""

from __future__ import annotations

import pytest

from edge_agent.devtools.fleet import FleetOptions
from edge_agent.devtools.fleetrun import Faults, load_windows, run_fleet
from tests.conftest import TEST_JSONL

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
