"""``edge-agent demo``: the whole hybrid loop on one machine, on real sensor data.

It starts a private mosquitto on a free loopback port, a cloud worker with
the stronger cloud pack, and the agent with the default pack replaying the
BasicMotions test windows with Gaussian sensor noise. It shows progress
while it runs and ends with what a newcomer wants to know: how much was
answered on the device, how much went to the cloud (urgent / batch), how
fast each path was, how accurate edge-only, hybrid and cloud-only answers
were on the same noisy readings, and what a month of it would cost compared
with sending everything to the cloud.

It does so for both routing policies side by side (``--policy both``, the
default), each with an agent of its own (device ``demo-fixed``, ``demo-learned``)
on the very same seeded readings. The learned policy (docs/routing.md) first sees
a warm-up, made visible in the summary: ``--warmup-loops`` passes over
``--warmup-data`` (the bundled train split: no test window is learned from) with
the same noise and the next seed, at the demo's pace; then the demo sends the
held batch and waits for the warm-up's verdicts before the measured readings
start. Only the measured readings are in the table. The hybrid answer is the
cloud's where its verdict corrects the local one (``router.correction_min_confidence``);
``hybrid_any_verdict`` lets every verdict win. ``--plot FILE.svg`` writes a
risk-coverage plot (demo_report.py).

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
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import Settings, load_settings
from edge_agent.devtools.costs import SECONDS_PER_MONTH
from edge_agent.devtools.demo_report import render, risk_coverage, write_risk_coverage
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.devtools.netproxy import NetProxy, profile
from edge_agent.errors import ConfigError
from edge_agent.ingest.readings import Item, Reading, ReadingDecoder
from edge_agent.ingest.sources import Source
from edge_agent.ingest.sources.replay import ReplaySource
from edge_agent.models.pack import resolve
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from edge_agent.util.progress import Progress
from edge_agent.util.stats import percentile
from edge_agent.wire.messages import Verdict

__all__ = ["POLICIES", "demo_settings", "render", "run_demo"]

#: The routing policies the demo runs side by side (``--policy both``).
POLICIES = ("fixed", "learned")

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


def demo_settings(
    base: Settings | None,
    state: Path,
    port: int,
    args: Any,
    *,
    device: str = "demo-device",
    policy: str = "",
) -> Settings:
    """The demo's settings: the user's file (if any) plus the demo's broker, data and pace."""
    env = {
        "EDGE_AGENT_DEVICE_ID": device,
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
    if policy:
        merged["EDGE_AGENT_ROUTER_POLICY"] = policy
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
    warm_data = Path(args.warmup_data)
    if args.warmup_loops and not warm_data.is_file():
        raise ConfigError(f"{warm_data}: demo warm-up data not found")
    truth = _truth(data)
    net = profile(getattr(args, "network", "loopback"))
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    broker = Mosquitto(workdir / "broker")
    proxy: NetProxy | None = None
    try:
        broker.start()
        # The agents reach the broker through the network profile's proxy; the cloud
        # worker sits next to the broker. ``loopback`` (the default) needs no proxy.
        device_port = broker.port
        if net.name != "loopback":
            proxy = NetProxy(broker.port, net).start()
            device_port = proxy.port
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
        cloud_labels = _cloud_labels(cloud, settings, data, args)
        started = time.monotonic()
        runs: dict[str, dict[str, Any]] = {}
        drained = True
        for policy in POLICIES if args.policy == "both" else (args.policy,):
            run = _run_policy(policy, edge, base=base, workdir=workdir, port=device_port, args=args)
            drained = drained and run.drained
            runs[policy] = _summarise(
                run, worker, truth=truth, cloud_labels=cloud_labels, args=args
            )
        elapsed = time.monotonic() - started
        worker.stop()
        first = next(iter(runs.values()))
        summary: dict[str, Any] = {
            "readings": first["readings"],
            "noise": args.noise,
            "policies": runs,
            "elapsed_s": round(elapsed, 2),
            "drained": drained,
            "models": {"edge": edge.ref, "cloud": cloud.ref},
            "network": {
                "profile": net.name,
                "describe": net.describe(),
                # Connections the proxy carried (the agents'), its simulated segment losses.
                "proxy_connections": proxy.connections if proxy is not None else 0,
                "proxy_losses": proxy.losses if proxy is not None else 0,
            },
        }
        if args.plot:
            write_risk_coverage(Path(args.plot), runs, args.noise)
            summary["plot"] = str(args.plot)
        edge.close()
        cloud.close()
        return summary
    finally:
        if proxy is not None:
            proxy.stop()
        broker.stop()
        if args.keep:
            sys.stderr.write(f"demo state kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class _Run:
    """One agent's run of the demo: its decision lines (warm-up first) and verdicts."""

    policy: str
    agent: Agent
    rows: list[dict[str, Any]] = field(default_factory=list)
    verdicts: dict[str, tuple[str, float]] = field(default_factory=dict)
    warmup: int = 0  #: the first ``warmup`` rows answer warm-up readings
    drained: bool = True
    warmup_s: float = 0.0


def _run_policy(
    policy: str, edge: Scorer, *, base: Settings | None, workdir: Path, port: int, args: Any
) -> _Run:
    """One agent (its own device id and state) under one routing policy; the learned one
    first replays the warm-up readings and waits for their verdicts."""
    settings = demo_settings(
        base, workdir / f"state-{policy}", port, args, device=f"demo-{policy}", policy=policy
    )
    lock = threading.Lock()
    rows: list[dict[str, Any]] = []
    verdicts: dict[str, tuple[str, float]] = {}

    def collect(text: bytes) -> None:
        lines = [json.loads(line) for line in text.splitlines()]
        with lock:
            rows.extend(r for r in lines if "label" in r or "error" in r)

    def on_verdict(v: Verdict) -> None:
        if v.no_verdict is not None:  # no cloud answer: the local one stands
            return
        with lock:
            verdicts[v.key] = (v.label, v.confidence)

    agent = Agent(settings, edge, emit=collect)
    agent.reconciler.listeners.append(on_verdict)
    run = _Run(policy, agent, rows, verdicts)
    measured = ReplaySource(
        str(args.data),
        settings.input.max_line_bytes,
        rate_hz=args.rate_hz,
        loops=args.loops,
        noise=args.noise,
        seed=args.seed,
        batch=settings.model.max_batch,
    )
    total = len(measured.lines) * args.loops
    source: Source = measured
    if policy == "learned" and args.warmup_loops > 0:
        warm = ReplaySource(
            str(args.warmup_data),
            settings.input.max_line_bytes,
            # At the demo's pace: drift monitoring (which resets the estimates when it
            # flags) sees the warm-up as it would see a device's history.
            rate_hz=args.rate_hz,
            loops=args.warmup_loops,
            noise=args.noise,
            seed=args.seed + 1,
            batch=settings.model.max_batch,
        )
        run.warmup = len(warm.lines) * args.warmup_loops
        total += run.warmup
        source = _Chain(warm, measured, lambda: _await_verdicts(agent, run))
    label = f"{policy} policy" + (f" (warm-up {run.warmup} first)" if run.warmup else "")
    code = _run_with_progress(agent, source, total, args.quiet, label)
    run.drained = code == 0
    return run


def _await_verdicts(agent: Agent, run: _Run, timeout_s: float = 60.0) -> None:
    """Between warm-up and measured readings: send the held batch, wait for the verdicts."""
    t0 = time.monotonic()
    agent.link.flush_batches()
    while time.monotonic() - t0 < timeout_s and agent.reconciler.waiting() > 0:
        agent.reconciler.sweep()
        time.sleep(0.02)
    run.warmup_s = time.monotonic() - t0


class _Chain:
    """Two sources one after the other, with a pause between them."""

    def __init__(self, first: Source, second: Source, between: Callable[[], None]) -> None:
        self.first, self.second, self.between = first, second, between

    def groups(self) -> Iterator[list[Item]]:
        yield from self.first.groups()
        self.between()
        yield from self.second.groups()

    def close(self) -> None:
        self.first.close()
        self.second.close()


def _run_with_progress(agent: Agent, source: Source, total: int, quiet: bool, label: str) -> int:
    """``agent.run`` to the end of the source, with a progress line on stderr."""
    progress = Progress(total, None if quiet else sys.stderr, label=label, plain_interval_s=2.0)
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


def _cloud_labels(cloud: Scorer, settings: Settings, data: Path, args: Any) -> dict[str, str]:
    """The cloud pack's label for each of the very same noisy readings (the same seeded
    replay), by reading id: the cloud-only answers."""
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
    out: dict[str, str] = {}
    for group in replay.groups():
        readings: list[Reading] = []
        for item in group:
            if isinstance(item, bytes):
                readings.append(decoder.decode(item))
        for d in cloud.score(readings):
            out[str(d.reading.id)] = d.label
    return out


def _grade(
    run: _Run,
    decisions: list[dict[str, Any]],
    truth: dict[str, str],
    cloud_labels: dict[str, str],
    replace_at: float,
) -> tuple[Counter[str], int, int, list[tuple[float, bool, str]]]:
    """Right answers per kind (edge, cloud, hybrid, hybrid_any), readings with a label,
    hard cases the cloud answered, and (confidence, local answer right, route) per reading.

    The hybrid answer is the cloud's when its verdict disagrees with confidence >=
    ``replace_at`` (``router.correction_min_confidence``), else the local one;
    ``hybrid_any`` lets every verdict win."""
    right: Counter[str] = Counter()
    answered = labelled = 0
    points: list[tuple[float, bool, str]] = []
    for d in decisions:
        label = truth.get(_base_id(d["id"]))
        if not label:
            continue
        labelled += 1
        right["edge"] += d["label"] == label
        right["cloud"] += cloud_labels.get(str(d["id"])) == label
        final = final_any = d["label"]
        if d["route"] == "hard" and d.get("key") in run.verdicts:
            answered += 1
            cloud_label, cloud_conf = run.verdicts[d["key"]]
            final_any = cloud_label
            final = cloud_label if cloud_conf >= replace_at else d["label"]
        right["hybrid"] += final == label
        right["hybrid_any"] += final_any == label
        points.append((float(d["confidence"]), d["label"] == label, d["route"]))
    return right, labelled, answered, points


def _summarise(
    run: _Run,
    worker: CloudWorker,
    *,
    truth: dict[str, str],
    cloud_labels: dict[str, str],
    args: Any,
) -> dict[str, Any]:
    agent = run.agent
    decisions = [r for r in run.rows[run.warmup :] if "label" in r]
    n = len(decisions)
    tiers = Counter(str(d.get("tier", "local")) for d in decisions)
    right, labelled, answered, points = _grade(
        run, decisions, truth, cloud_labels, agent.settings.router.correction_min_confidence
    )
    lat = agent.latency.percentiles()
    rtt = list(agent.reconciler.round_trips_ms)
    pricing = worker.ledger.summary()["pricing"]
    unit_u, unit_b = pricing["unit_price_urgent"], pricing["unit_price_batch"]
    monthly = args.readings_per_second * SECONDS_PER_MONTH
    share_u = tiers["urgent"] / n if n else 0.0
    share_b = tiers["batch"] / n if n else 0.0
    local_right = [ok for (_, ok, route) in points if route == "local"]

    def acc(key: str) -> float | None:
        return round(right[key] / labelled, 4) if labelled else None

    warm = [r for r in run.rows[: run.warmup] if "label" in r]
    warm_tiers = Counter(str(d.get("tier", "local")) for d in warm)
    return {
        "policy": run.policy,
        "readings": n,
        "rejected": sum(1 for r in run.rows[run.warmup :] if "error" in r),
        "local": tiers["local"],
        "urgent": tiers["urgent"],
        "batch": tiers["batch"],
        "alerts": tiers["alert"],
        "escalated": tiers["urgent"] + tiers["batch"],
        "audit": sum(1 for d in decisions if d.get("reason") == "audit"),
        "share_local": round(tiers["local"] / n, 4) if n else None,
        "share_urgent": round(share_u, 4),
        "share_batch": round(share_b, 4),
        "hard_answered_by_cloud": answered,
        "local_latency_ms": {k: (round(v, 3) if v is not None else None) for k, v in lat.items()},
        "cloud_round_trip_ms": {"p50": _pct(rtt, 50), "p99": _pct(rtt, 99), "n": len(rtt)},
        "accuracy": {
            "edge_only": acc("edge"),
            "hybrid": acc("hybrid"),
            "hybrid_any_verdict": acc("hybrid_any"),
            "cloud_only": acc("cloud"),
            "local_answers": round(sum(local_right) / len(local_right), 4) if local_right else None,
        },
        "risk_coverage": risk_coverage([(c, ok) for c, ok, _ in points]),
        "monthly_cost_usd": {
            "readings_per_second": args.readings_per_second,
            "all_cloud_sync": round(monthly * unit_u, 2),
            "all_cloud_batch": round(monthly * unit_b, 2),
            "hybrid": round(monthly * (share_u * unit_u + share_b * unit_b), 2),
            "pricing": pricing,
        },
        "warmup": {
            "readings": len(warm),
            "data": str(args.warmup_data),
            "seed": args.seed + 1,
            "escalated": warm_tiers["urgent"] + warm_tiers["batch"],
            "cost_usd": round(warm_tiers["urgent"] * unit_u + warm_tiers["batch"] * unit_b, 2),
            "verdict_wait_s": round(run.warmup_s, 2),
        },
        "routing": agent.learned.snapshot() if agent.learned is not None else {"policy": "fixed"},
        "noise": args.noise,
    }
