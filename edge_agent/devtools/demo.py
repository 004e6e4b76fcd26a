"""``edge-agent demo``: the whole hybrid loop on one machine, on real sensor data.

It starts a private mosquitto on a free loopback port, a cloud worker with
the stronger cloud pack, and the agent with the default pack replaying the
BasicMotions test windows with Gaussian sensor noise. It shows progress
while it runs and ends with what a newcomer wants to know: how much was
answered on the device, how much went to the cloud (urgent / batch), how
fast each path was, how accurate edge-only, hybrid and cloud-only answers
were on the same noisy readings, and what a month of it would cost compared
with sending everything to the cloud.

Nothing leaves the machine: every process talks over 127.0.0.1 and stops at
the end; the temporary state is removed unless ``--keep`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import Settings, load_settings
from edge_agent.devtools.costs import SECONDS_PER_MONTH
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.errors import ConfigError
from edge_agent.ingest.readings import Reading, ReadingDecoder
from edge_agent.ingest.sources.replay import ReplaySource
from edge_agent.models.pack import resolve
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from edge_agent.util.progress import Progress
from edge_agent.util.stats import percentile
from edge_agent.wire.messages import Verdict

log = logging.getLogger(__name__)


class _Truth(msgspec.Struct):
    id: Any = None
    label: str = ""


def _truth(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            row = msgspec.json.decode(line, type=_Truth)
            out[str(row.id)] = row.label
    return out


def _base_id(reading_id: Any) -> str:
    return str(reading_id).split("#", 1)[0]


def _pct(values: list[float], q: float) -> float | None:
    p = percentile(values, q)
    return round(p, 3) if p is not None else None


def demo_settings(base: Settings | None, state: Path, port: int, args: Any) -> Settings:
    """The demo's settings: the user's file (if any) plus the demo's broker, data and pace."""
    env = {
        "EDGE_AGENT_DEVICE_ID": "demo-device",
        "EDGE_AGENT_DEVICE_STATE_DIR": str(state),
        "EDGE_AGENT_MQTT_HOST": "127.0.0.1",
        "EDGE_AGENT_MQTT_PORT": str(port),
        "EDGE_AGENT_MQTT_TOPIC_PREFIX": "demo",
        "EDGE_AGENT_SOURCE_KIND": "replay",
        "EDGE_AGENT_SOURCE_PATH": str(args.data),
        "EDGE_AGENT_SOURCE_RATE_HZ": str(args.rate_hz),
        "EDGE_AGENT_SOURCE_LOOPS": str(args.loops),
        "EDGE_AGENT_SOURCE_NOISE": str(args.noise),
        "EDGE_AGENT_SOURCE_SEED": str(args.seed),
        "EDGE_AGENT_CLOUD_WORKER_ID": "demo-cloud",
        "EDGE_AGENT_TELEMETRY_INTERVAL_S": "1",
    }
    if base is not None and base.model.pack:
        env["EDGE_AGENT_MODEL_PACK"] = base.model.pack
    # The user's EDGE_AGENT_* variables apply too, except where the demo must decide.
    merged = {k: v for k, v in os.environ.items() if k.startswith("EDGE_AGENT_")}
    merged.pop("EDGE_AGENT_CONFIG", None)
    merged.update(env)
    return load_settings(None, env=merged)


def _progress_note(agent: Agent) -> str:
    c = agent.pipeline.counts
    verdicts = agent.reconciler.counters
    return (
        f"local {c['local']}  hard {c['hard']}"
        f"  verdicts {verdicts['verdicts_on_time'] + verdicts['verdicts_batch']}"
    )


def _readings_done(agent: Agent) -> int:
    c = agent.pipeline.counts
    return int(c["local"] + c["hard"] + c["rejected"])


def run_demo(args: Any, base: Settings | None) -> dict[str, Any]:
    """Run the demo and return its summary (see module docstring)."""
    data = Path(args.data)
    if not data.is_file():
        raise ConfigError(f"{data}: demo data not found")
    truth = _truth(data)
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    broker = Mosquitto(workdir / "broker")
    try:
        broker.start()
        settings = demo_settings(base, workdir / "state", broker.port, args)
        m = settings.model
        edge_pack = resolve(m.pack, m.packs_dir, m.store_dir)
        cloud_pack = resolve(settings.cloud.pack, m.packs_dir, m.store_dir)
        edge = Scorer.open(edge_pack)
        cloud = Scorer.open(cloud_pack)
        worker = CloudWorker(settings, scorer=cloud)
        worker.start()
        if not worker.ready.wait(10):
            raise ConfigError("the demo's cloud worker did not connect to the local broker")
        decisions: list[dict[str, Any]] = []
        verdicts: dict[str, str] = {}
        lock = threading.Lock()

        def collect(text: bytes) -> None:
            rows = [json.loads(line) for line in text.splitlines()]
            with lock:
                decisions.extend(r for r in rows if "label" in r)

        def on_verdict(v: Verdict) -> None:
            if v.no_verdict is not None:  # no cloud answer: the local one stands
                return
            with lock:
                verdicts[v.key] = v.label

        agent = Agent(settings, edge, emit=collect)
        agent.reconciler.listeners.append(on_verdict)
        source = ReplaySource(
            str(data),
            settings.input.max_line_bytes,
            rate_hz=args.rate_hz,
            loops=args.loops,
            noise=args.noise,
            seed=args.seed,
            batch=settings.model.max_batch,
        )
        started = time.monotonic()
        code = _run_with_progress(agent, source, len(source.lines) * args.loops, args.quiet)
        elapsed = time.monotonic() - started
        worker.stop()
        cloud_only = _cloud_only_accuracy(cloud, settings, data, args, truth)
        summary = _summarise(
            agent,
            worker,
            decisions=decisions,
            verdicts=verdicts,
            truth=truth,
            cloud_only=cloud_only,
            args=args,
        )
        summary["elapsed_s"] = round(elapsed, 2)
        summary["drained"] = code == 0
        summary["models"] = {"edge": edge.ref, "cloud": cloud.ref}
        edge.close()
        cloud.close()
        return summary
    finally:
        broker.stop()
        if args.keep:
            sys.stderr.write(f"demo state kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_with_progress(agent: Agent, source: ReplaySource, total: int, quiet: bool) -> int:
    """``agent.run`` to the end of the source, with a progress line on stderr."""
    progress = Progress(
        total, None if quiet else sys.stderr, label="readings", plain_interval_s=2.0
    )
    ticker_stop = threading.Event()

    def tick() -> None:
        while not ticker_stop.wait(0.1):
            progress.update(_readings_done(agent), _progress_note(agent))

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    code = agent.run(source, exit_when_drained=True, drain_timeout_s=30)
    ticker_stop.set()
    ticker.join(2)
    progress.done = _readings_done(agent)
    progress.finish(_progress_note(agent))
    return code


def _cloud_only_accuracy(
    cloud: Scorer, settings: Settings, data: Path, args: Any, truth: dict[str, str]
) -> float | None:
    """The cloud pack on the very same noisy readings (the same seeded replay)."""
    replay = ReplaySource(
        str(data),
        settings.input.max_line_bytes,
        rate_hz=0,
        loops=args.loops,
        noise=args.noise,
        seed=args.seed,
        batch=256,
    )
    decoder = ReadingDecoder(cloud.shape, settings.input.max_line_bytes)
    right = n = 0
    for group in replay.groups():
        readings: list[Reading] = []
        for item in group:
            if isinstance(item, bytes):
                readings.append(decoder.decode(item))
        for d in cloud.score(readings):
            label = truth.get(_base_id(d.reading.id))
            if label:
                n += 1
                right += d.label == label
    return right / n if n else None


def _summarise(
    agent: Agent,
    worker: CloudWorker,
    *,
    decisions: list[dict[str, Any]],
    verdicts: dict[str, str],
    truth: dict[str, str],
    cloud_only: float | None,
    args: Any,
) -> dict[str, Any]:
    n = len(decisions)
    local = [d for d in decisions if d["route"] == "local"]
    urgent = [d for d in decisions if d.get("tier") == "urgent"]
    batch = [d for d in decisions if d.get("tier") == "batch"]
    edge_right = hybrid_right = labelled = answered = 0
    for d in decisions:
        label = truth.get(_base_id(d["id"]))
        if not label:
            continue
        labelled += 1
        edge_right += d["label"] == label
        final = d["label"]
        if d["route"] == "hard" and d.get("key") in verdicts:
            final = verdicts[d["key"]]
            answered += 1
        hybrid_right += final == label
    lat = agent.latency.percentiles()
    rtt = list(agent.reconciler.round_trips_ms)
    pricing = worker.ledger.summary()["pricing"]
    unit_u, unit_b = pricing["unit_price_urgent"], pricing["unit_price_batch"]
    monthly = args.readings_per_second * SECONDS_PER_MONTH
    share_u = len(urgent) / n if n else 0.0
    share_b = len(batch) / n if n else 0.0
    return {
        "readings": n,
        "rejected": agent.pipeline.counts["rejected"],
        "local": len(local),
        "urgent": len(urgent),
        "batch": len(batch),
        "share_local": round(len(local) / n, 4) if n else None,
        "share_urgent": round(share_u, 4),
        "share_batch": round(share_b, 4),
        "hard_answered_by_cloud": answered,
        "local_latency_ms": {k: (round(v, 3) if v is not None else None) for k, v in lat.items()},
        "cloud_round_trip_ms": {"p50": _pct(rtt, 50), "p99": _pct(rtt, 99), "n": len(rtt)},
        "accuracy": {
            "edge_only": round(edge_right / labelled, 4) if labelled else None,
            "hybrid": round(hybrid_right / labelled, 4) if labelled else None,
            "cloud_only": round(cloud_only, 4) if cloud_only is not None else None,
        },
        "monthly_cost_usd": {
            "readings_per_second": args.readings_per_second,
            "all_cloud_sync": round(monthly * unit_u, 2),
            "all_cloud_batch": round(monthly * unit_b, 2),
            "hybrid": round(monthly * (share_u * unit_u + share_b * unit_b), 2),
            "pricing": pricing,
        },
        "cloud_worker": {k: v for k, v in worker.counters.items() if v},
        "noise": args.noise,
    }


def render(summary: dict[str, Any]) -> str:
    """The summary as a few lines a newcomer can read."""
    s = summary
    lat, rtt, acc, cost = (
        s["local_latency_ms"],
        s["cloud_round_trip_ms"],
        s["accuracy"],
        s["monthly_cost_usd"],
    )

    def pct(x: float | None) -> str:
        return f"{100 * x:.1f}%" if x is not None else "-"

    def ms(x: float | None) -> str:
        return f"{x:.2f} ms" if x is not None else "-"

    rate = cost["readings_per_second"]
    return "\n".join(
        [
            "",
            f"edge-agent demo — {s['models']['edge']} on the device,"
            f" {s['models']['cloud']} in the cloud, sensor noise {s['noise']} x channel std",
            f"  readings            {s['readings']} in {s['elapsed_s']} s"
            f" ({s['rejected']} rejected)",
            f"  answered locally    {s['local']} ({pct(s['share_local'])})",
            f"  escalated urgent    {s['urgent']} ({pct(s['share_urgent'])}),"
            f" batch {s['batch']} ({pct(s['share_batch'])});"
            f" cloud answered {s['hard_answered_by_cloud']}",
            f"  local latency       p50 {ms(lat['p50'])}, p99 {ms(lat['p99'])}",
            f"  cloud round trip    p50 {ms(rtt['p50'])}, p99 {ms(rtt['p99'])}"
            " (local broker, cloud model included)",
            f"  accuracy            edge only {pct(acc['edge_only'])}, hybrid {pct(acc['hybrid'])},"
            f" cloud only {pct(acc['cloud_only'])}",
            f"  monthly cost at {rate:g} reading/s: all-cloud sync ${cost['all_cloud_sync']:,.2f},"
            f" all-cloud batch ${cost['all_cloud_batch']:,.2f}, hybrid ${cost['hybrid']:,.2f}",
            "",
        ]
    )
