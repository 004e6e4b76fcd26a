"""Round trip of urgent hard cases with a real OpenAI-compatible endpoint in the loop.

Starts a private mosquitto and llama-cpp-python's server (scripts/llama_server.py, the SmolLM2
GGUF of the model store) on free loopback ports, a cloud worker with ``cloud.backend =
"endpoint"`` and the ``basicmotions-cloud-endpoint`` pack, and sends N urgent hard cases (real
BasicMotions test windows) one after the other as a device does (QoS 1, ResponseTopic,
CorrelationData). Prints p50/p99 of the device-side round trip, the worker's time per case,
tokens per request, the ledger's spend, and how many answers parsed. Needs the dev, cloud-http,
llm and llm-server extras (``bash scripts/setup --dev --llm``).

    .venv/bin/python scripts/endpoint_roundtrip.py [-n 50] [--ledger out.json] [--json]

``--json > endpoint.json`` then ``edge-agent bench --endpoint-latency endpoint.json`` adds the
endpoint tier to the benchmark's network section (its worker time per case, p50 and p99).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.cloud.ledger_store import summary_of
from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import load_settings
from edge_agent.devtools.localbroker import Mosquitto, free_port
from edge_agent.models.fetch import source_file
from edge_agent.models.pack import BUNDLED_TEST_DATA, open_pack, resolve
from edge_agent.mqtt.session import set_nodelay
from edge_agent.util.stats import percentile
from edge_agent.wire.messages import (
    SCHEMA_VERSION,
    HardCase,
    LocalDecision,
    Tier,
    Topics,
    decode_verdicts,
    encoder,
)

ROOT = Path(__file__).resolve().parent.parent


def start_server(port: int, gguf: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, str(ROOT / "scripts" / "llama_server.py"), "--model", str(gguf),
        "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "1024", "--n_threads", "2", "--verbose", "False",
    ]  # fmt: skip
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
        )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the llama server did not start: {log.read_text()[-2000:]}")


def ask(
    dev: mqtt.Client,
    inbox: queue.Queue[tuple[int, bytes]],
    topics: Topics,
    windows: list[Any],
    n: int,
) -> tuple[list[float], list[float], list[str]]:
    """Send ``n`` urgent cases one after the other (after one warm-up); round trips, the
    worker's own time, and what each answer was (a label or a no-verdict reason)."""
    rtt, cloud_ms, outcomes = [], [], []
    for i in range(n + 1):  # the first is a warm-up, not counted
        case = HardCase(
            v=SCHEMA_VERSION, key=f"dev1:{i}", device="dev1", seq=i,
            values=windows[i % len(windows)],
            local=LocalDecision("walking", 0.41, "low_confidence", "basicmotions-int8@1"),
            tier=Tier.URGENT, deadline_ms=10_000.0, readings_total=i + 1,
        )  # fmt: skip
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = topics.verdict("dev1")
        props.CorrelationData = case.key.encode()
        t0 = time.perf_counter_ns()
        dev.publish(topics.hard("dev1"), encoder.encode(case), qos=1, properties=props)
        t1, payload = inbox.get(timeout=30)
        v = decode_verdicts(payload)[0]
        if i:
            rtt.append((t1 - t0) / 1e6)
            cloud_ms.append(v.cloud_ms)
            outcomes.append(v.label if v.no_verdict is None else v.no_verdict)
    return rtt, cloud_ms, outcomes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=50, help="urgent cases, sent one after the other")
    ap.add_argument("--ledger", help="keep the worker's ledger file here")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    llm = open_pack(ROOT / "models" / "smollm2-basicmotions")
    llm.verify()
    gguf = source_file(llm) or llm.location(next(f for f in llm.manifest.files if f.store))
    windows = [json.loads(x)["values"] for x in BUNDLED_TEST_DATA.read_text().splitlines() if x]
    labels = resolve("basicmotions-cloud-endpoint").manifest.labels
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ledger = Path(args.ledger) if args.ledger else tmp / "ledger.db"
        broker = Mosquitto(tmp / "broker").start()
        port = free_port()
        server = start_server(port, gguf, tmp / "llama.log")
        settings = load_settings(
            None,
            env={
                "EDGE_AGENT_MQTT_PORT": str(broker.port),
                "EDGE_AGENT_MQTT_TOPIC_PREFIX": "rt",
                "EDGE_AGENT_CLOUD_BACKEND": "endpoint",
                "EDGE_AGENT_CLOUD_PACK": "basicmotions-cloud-endpoint",
                "EDGE_AGENT_CLOUD_LEDGER_PATH": str(ledger),
                "EDGE_AGENT_ENDPOINT_BASE_URL": f"http://127.0.0.1:{port}/v1",
                "EDGE_AGENT_ENDPOINT_MODEL": "smollm2",
            },
        )
        worker = CloudWorker(settings)
        worker.start()
        if not worker.ready.wait(10):
            raise SystemExit(f"worker not ready: {worker.last_error}")
        topics = Topics("rt")
        inbox: queue.Queue[tuple[int, bytes]] = queue.Queue()
        dev = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        dev.on_message = lambda _c, _u, m: inbox.put((time.perf_counter_ns(), bytes(m.payload)))
        dev.connect("127.0.0.1", broker.port)
        set_nodelay(dev)
        dev.subscribe(topics.verdict("dev1"), qos=1)
        dev.loop_start()
        time.sleep(0.3)
        try:
            rtt, cloud_ms, outcomes = ask(dev, inbox, topics, windows, args.n)
        finally:
            dev.loop_stop()
            dev.disconnect()
            worker.stop()
            server.terminate()
            server.wait(10)
            broker.stop()
        summary = summary_of(ledger)  # the ledger is an SQLite file (or an old JSON one)
    p = summary["pricing"]
    out = {
        "cases": len(rtt),
        "round_trip_ms_p50": percentile(rtt, 50),
        "round_trip_ms_p99": percentile(rtt, 99),
        "worker_ms_per_case_mean": float(np.mean(cloud_ms)),
        # The endpoint worker's own time per case, for ``edge-agent bench --endpoint-latency``.
        "worker_ms_p50": percentile(cloud_ms, 50),
        "worker_ms_p99": percentile(cloud_ms, 99),
        "mean_prompt_tokens": p["mean_prompt_tokens"],
        "mean_completion_tokens": p["mean_completion_tokens"],
        "spend": summary["total"]["spend"],
        "unit_price_urgent": p["unit_price_urgent"],
        "parsed": sum(o in labels for o in outcomes),
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "counters": {k: v for k, v in sorted(worker.counters.items()) if "endpoint" in k},
    }
    print(json.dumps(out, indent=1) if args.json else sentence(out))
    return 0


def sentence(out: dict[str, Any]) -> str:
    return (
        f"{out['cases']} urgent cases through mosquitto + worker + llama.cpp server:"
        f" round trip p50 {out['round_trip_ms_p50']:.1f} ms, p99"
        f" {out['round_trip_ms_p99']:.1f} ms; worker time per case"
        f" {out['worker_ms_per_case_mean']:.1f} ms; tokens per request"
        f" {out['mean_prompt_tokens']:.1f} prompt + {out['mean_completion_tokens']:.1f}"
        f" completion; spend ${out['spend']:.6f} (${out['unit_price_urgent']:.6f} per case);"
        f" answers that parsed {out['parsed']}/{out['cases']}: {out['outcomes']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
