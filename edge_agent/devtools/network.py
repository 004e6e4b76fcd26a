"""The benchmark's network section: edge, all-cloud and hybrid latency per network profile.

For each profile (``netproxy.PROFILES``, chosen with ``edge-agent bench --network``) the
device's connection to the benchmark's mosquitto goes through a ``NetProxy`` with that
profile's delay, jitter and loss; the cloud worker sits next to the broker (direct, as in a
cloud region). Measured in the same run, per profile:

* **edge** — the agent's local decision latency (scoring and routing), from the hybrid run
  below: the network does not touch it, and the figures show it does not.
* **all-cloud sync** — every reading a synchronous cloud call: a hard case published through
  the proxy, answered by the cloud worker (the cloud pack), the verdict back through the proxy.
  Samples per profile are bounded by time (``budget_ms``): a satellite round trip costs 0.6 s.
* **hybrid** — the real agent (default pack, readings replayed with sensor noise
  ``HYBRID_NOISE`` at ``HYBRID_RATE_HZ``) with its broker connection through the proxy. The
  replay runs faster than a device (``DEVICE_RATE_HZ``), so the router's time-based brakes
  (``router.cooldown_s``, ``router.max_urgent_per_minute``) are scaled by the same factor.
  **Hybrid latency** is the time until the answer a reading ends with: the local decision
  for readings answered on the device or sent to the batch tier (the device acts on its answer
  at once; a batch verdict is a later audit that nobody waits for); for an urgent hard case,
  its local decision latency plus the round trip from hand-off to the cloud's verdict, or
  ``router.deadline_ms`` when no verdict came in time (the local answer then stands). The
  share of readings that waited on the network is the urgent share.
* **endpoint tier** — when a measured endpoint latency is given (``--endpoint-latency FILE``,
  the JSON of ``scripts/endpoint_roundtrip.py --json``): the profile's network part of the
  all-cloud round trip (the sync round trip less the cloud pack's own time, per sample) plus
  the endpoint worker's measured time per case, p50 to p50 and p99 to p99 (a sum of p99s:
  on the safe side). Nothing is guessed when no file is given; the row says so.
* **deadlines** — which urgent deadlines each profile can honour: those at or above the p99
  of its all-cloud round trip (``DEADLINES_MS`` and the config's ``router.deadline_ms``).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import Settings
from edge_agent.devtools.measure import _CloudClient, agent_settings, stats
from edge_agent.devtools.netproxy import NetProxy, NetworkProfile, profile
from edge_agent.errors import EdgeAgentError
from edge_agent.ingest.sources import Source
from edge_agent.ingest.sources.replay import ReplaySource
from edge_agent.models.pack import resolve
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from edge_agent.service.telemetry import LatencyWindow
from edge_agent.wire.messages import SCHEMA_VERSION, HardCase, LocalDecision, Tier, Verdict

__all__ = [
    "DEADLINES_MS",
    "DEFAULT_PROFILES",
    "endpoint_latency",
    "network_lines",
    "network_section",
    "parse_profiles",
]

#: Profiles the bench measures unless ``--network`` says otherwise.
DEFAULT_PROFILES = ("loopback", "wired", "lte", "satellite")
#: Urgent deadlines (ms) each profile is checked against, with the config's router.deadline_ms.
DEADLINES_MS = (50.0, 100.0, 250.0, 500.0, 1000.0)
#: Sensor noise (x channel std) and pace of the hybrid run: hard cases occur at this noise.
HYBRID_NOISE = 1.5
HYBRID_RATE_HZ = 100.0
#: The pace of the device the hybrid run stands for (the cost section's 1 reading/s).
DEVICE_RATE_HZ = 1.0


def parse_profiles(text: str) -> list[str]:
    """``"wired,lte"`` -> the profile names, each checked (``""`` or ``"none"``: none)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    return [profile(n).name for n in names]


def endpoint_latency(path: Path) -> dict[str, Any]:
    """The endpoint's own measured time per case, from ``scripts/endpoint_roundtrip.py --json``."""
    try:
        doc = json.loads(path.read_text())
        out = {
            "file": str(path),
            "cases": int(doc["cases"]),
            "p50_ms": float(doc["worker_ms_p50"]),
            "p99_ms": float(doc["worker_ms_p99"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeAgentError(
            f"{path}: not the JSON of scripts/endpoint_roundtrip.py --json"
            f" (needs cases, worker_ms_p50, worker_ms_p99): {exc}"
        ) from exc
    return out


def _samples(net: NetworkProfile, quick: bool) -> int:
    """Sync round trips to measure: what fits in a few seconds, bounded both ways."""
    budget_ms, low, high = (3000.0, 8, 60) if quick else (15000.0, 20, 300)
    return int(min(high, max(low, budget_ms / max(net.rtt_ms, 1.0))))


def _sync(
    settings: Settings, net: NetworkProfile, n: int, data: list[list[list[float]]]
) -> dict[str, Any]:
    """n urgent cases one after the other through the proxy, each answered by the worker."""
    client = _CloudClient(settings)
    local = LocalDecision("unknown", 0.0, None, "none")
    rtt, network_only = [], []
    lost = 0
    try:
        for i in range(n + 2):  # the first two warm the path up and are not counted
            case = HardCase(
                v=SCHEMA_VERSION,
                key=f"net-{net.name}-sync:{i}",
                device="bench",
                seq=i,
                values=data[i % len(data)],
                local=local,
                tier=Tier.URGENT,
            )
            t0 = time.perf_counter_ns()
            v = client.ask(case)
            total = (time.perf_counter_ns() - t0) / 1e6
            if i < 2:
                continue
            if v is None:
                lost += 1
                continue
            rtt.append(total)
            network_only.append(max(0.0, total - v.cloud_ms))
    finally:
        client.close()
    out = stats(rtt)
    out["lost"] = lost
    out["network_only"] = stats(network_only)
    return out


class _Recorder:
    """Per reading of a real agent: its local latency and, for urgent cases, when the verdict
    came. Wraps the agent's latency window and ``reconciler.expect``; listens to verdicts.

    The agent records a scored group's latencies before it routes the group, so an urgent
    case is matched to the next unmatched reading of the group being routed (exact for the
    paced replay here, which scores one reading per group)."""

    def __init__(self, agent: Agent) -> None:
        self.latencies: list[float] = []
        self.sent: dict[str, tuple[int, float]] = {}  # key -> (reading index, hand-off time)
        self.arrived: dict[str, float] = {}
        self._lock = threading.Lock()
        self._group_start = self._group_used = 0
        recorder = self

        class _Window(LatencyWindow):
            def record(self, ms: float) -> None:
                super().record(ms)
                recorder.group([ms])

            def record_many(self, values: list[float]) -> None:
                super().record_many(values)
                recorder.group(values)

        agent.latency = _Window(agent.settings.telemetry.latency_window)
        expect = agent.reconciler.expect

        def expect_and_note(key: str, local_label: str, tier: Tier) -> None:
            if tier == Tier.URGENT:
                i = min(self._group_start + self._group_used, len(self.latencies) - 1)
                self._group_used += 1
                with self._lock:
                    self.sent[key] = (i, time.monotonic())
            expect(key, local_label, tier)

        agent.reconciler.expect = expect_and_note  # type: ignore[method-assign]
        agent.reconciler.listeners.append(self._on_verdict)

    def group(self, values: list[float]) -> None:
        self._group_start, self._group_used = len(self.latencies), 0
        self.latencies.extend(values)

    def _on_verdict(self, v: Verdict) -> None:
        if v.tier == Tier.URGENT and v.no_verdict is None:
            with self._lock:
                self.arrived.setdefault(v.key, time.monotonic())

    def hybrid(self, deadline_ms: float) -> dict[str, Any]:
        final = list(self.latencies)
        rtt, missed = [], 0
        with self._lock:
            for key, (i, sent) in self.sent.items():
                came = self.arrived.get(key)
                wait = (came - sent) * 1000.0 if came is not None else None
                if wait is None or wait > deadline_ms:
                    missed += 1
                    final[i] += deadline_ms
                else:
                    rtt.append(wait)
                    final[i] += wait
        n = len(final)
        return {
            "readings": n,
            "urgent": len(self.sent),
            "waited_share": len(self.sent) / n if n else 0.0,
            "deadline_missed": missed,
            "latency": stats(final),
            "edge": stats(self.latencies),
            "round_trip": stats(rtt),
        }


class _AfterConnect:
    """A source that yields its readings only once the agent's link is connected, so the
    round trips measure the network and not the first connection's handshakes."""

    def __init__(self, source: Source, agent: Agent, timeout_s: float = 30.0) -> None:
        self.source, self.agent, self.timeout_s = source, agent, timeout_s

    def groups(self) -> Any:
        if not self.agent.link.connected.wait(self.timeout_s):
            raise EdgeAgentError("the bench agent did not connect through the network proxy")
        yield from self.source.groups()

    def close(self) -> None:
        self.source.close()


def _compressed(settings: Settings, work: Path, port: int, name: str) -> Settings:
    """The device's settings with the router's time-based brakes compressed by the replay's
    speed-up (``HYBRID_RATE_HZ`` over ``DEVICE_RATE_HZ``), so the urgent share is the one a
    device at its own pace would have."""
    speedup = HYBRID_RATE_HZ / DEVICE_RATE_HZ
    r = settings.router
    return agent_settings(
        work,
        port,
        "bench/net",
        device_id=f"net-{name}",
        router_cooldown_s=str(r.cooldown_s / speedup),
        router_max_urgent_per_minute=str(int(r.max_urgent_per_minute * speedup)),
    )


def _hybrid(scorer: Scorer, settings: Settings, data: Path, loops: int) -> dict[str, Any]:
    agent = Agent(settings, scorer)
    recorder = _Recorder(agent)
    replay = ReplaySource(
        str(data),
        settings.input.max_line_bytes,
        rate_hz=HYBRID_RATE_HZ,
        loops=loops,
        noise=HYBRID_NOISE,
        seed=0,
        batch=settings.model.max_batch,
    )
    deadline_ms = settings.router.deadline_ms
    code = agent.run(
        _AfterConnect(replay, agent),
        exit_when_drained=True,
        drain_timeout_s=deadline_ms / 1000.0 + 10.0,
    )
    out = recorder.hybrid(deadline_ms)
    out["drained"] = code == 0
    out["deadline_ms"] = deadline_ms
    return out


def honoured(p99_ms: float | None, deadlines: list[float]) -> list[float]:
    """The deadlines a p99 round trip fits under."""
    return [d for d in deadlines if p99_ms is not None and p99_ms <= d]


def network_section(
    opts: Any, x: np.ndarray, broker_port: int, work: Path, progress: Any
) -> dict[str, Any]:
    """Every profile of ``opts.network``, one after the other, with one cloud worker next to
    the broker. ``opts`` is the bench's options (``network``, ``quick``, ``data``,
    ``endpoint_latency``); ``x`` the test windows."""
    names = parse_profiles(opts.network)
    quick, data, endpoint_file = opts.quick, Path(opts.data), opts.endpoint_latency
    windows: list[list[list[float]]] = x.tolist()
    cloud = agent_settings(work / "net-cloud", broker_port, "bench/net")
    deadlines = sorted({*DEADLINES_MS, cloud.router.deadline_ms})
    endpoint = endpoint_latency(endpoint_file) if endpoint_file is not None else None
    worker = CloudWorker(cloud)
    worker.start()
    if not worker.ready.wait(10):
        raise EdgeAgentError("the benchmark's cloud worker did not subscribe")
    scorer = Scorer.open(resolve())
    out: dict[str, Any] = {
        "deadlines_ms": deadlines,
        "endpoint": endpoint,
        "cloud_model": worker.scorer.ref,
        "edge_model": scorer.ref,
        "profiles": {},
    }
    try:
        for i, name in enumerate(names):
            net = profile(name)
            t0 = time.monotonic()
            with NetProxy(broker_port, net, seed=i) as proxy:
                device = agent_settings(
                    work / f"net-{name}", proxy.port, "bench/net", device_id=f"net-{name}"
                )
                sync = _sync(device, net, _samples(net, quick), windows)
                paced = _compressed(device, work / f"net-{name}-h", proxy.port, name)
                hyb = _hybrid(scorer, paced, data, 4 if quick else 10)
                losses, connections = proxy.losses, proxy.connections
            entry: dict[str, Any] = {
                "rtt_ms": net.rtt_ms,
                "jitter_ms": net.jitter_ms,
                "loss": net.loss,
                "describe": net.describe(),
                "sync": sync,
                "hybrid": hyb,
                "proxy_losses": losses,
                "proxy_connections": connections,
                "honoured_ms": honoured(sync.get("p99_ms"), deadlines),
                "seconds": round(time.monotonic() - t0, 2),
            }
            if endpoint is not None:
                net_only = sync["network_only"]
                ep = {
                    "p50_ms": net_only.get("p50_ms", 0.0) + endpoint["p50_ms"],
                    "p99_ms": net_only.get("p99_ms", 0.0) + endpoint["p99_ms"],
                }
                ep["honoured_ms"] = honoured(ep["p99_ms"], deadlines)
                entry["endpoint"] = ep
            out["profiles"][name] = entry
            progress.step(f"network {name} ({net.describe()}): {entry['seconds']} s")
    finally:
        scorer.close()
        worker.stop()
    return out


# -- the report -----------------------------------------------------------------------


def _pair(s: dict[str, Any] | None) -> str:
    if not s or s.get("p50_ms") is None:
        return "-"
    return f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f}"


def _deadlines(ms: list[float]) -> str:
    return ", ".join(f"{d:g}" for d in ms) + " ms" if ms else "none of those listed"


def network_lines(results: dict[str, Any]) -> list[str]:
    """The network section of the text report (empty when the run had none)."""
    net = results.get("network")
    if not net or not net["profiles"]:
        return []
    ep = net.get("endpoint")
    head = ["profile", "edge p50/p99", "all-cloud p50/p99 (n)", "hybrid p50/p99", "waited"]
    head += ["urgent RTT p50/p99 (n)"] + (["via LLM endpoint p50/p99"] if ep else [])
    rows = [tuple(head)]
    for name, e in net["profiles"].items():
        h = e["hybrid"]
        row = [
            f"{name} ({e['describe']})",
            _pair(h["edge"]),
            f"{_pair(e['sync'])} ({e['sync']['n']})",
            _pair(h["latency"]),
            f"{100 * h['waited_share']:.1f}%",
            f"{_pair(h['round_trip'])} ({h['round_trip']['n']})",
        ]
        rows.append(tuple(row + ([_pair(e.get("endpoint"))] if ep else [])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "",
        f"network profiles (device <-> broker through the delay proxy; ms; edge"
        f" {net['edge_model']}, cloud {net['cloud_model']}):",
    ]
    lines += [
        "  "
        + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in rows
    ]
    lines.append(
        "  hybrid = time to each reading's final answer (urgent cases: local decision + verdict"
        " round trip, or the deadline); waited = share of readings that waited on the network"
    )
    for name, e in net["profiles"].items():
        missed = e["hybrid"]["deadline_missed"]
        text = (
            f"  {name}: urgent deadlines honoured (all-cloud p99 <= deadline):"
            f" {_deadlines(e['honoured_ms'])}"
        )
        if missed:
            text += f"; {missed} urgent missed router.deadline_ms in the hybrid run"
        if "endpoint" in e:
            text += f"; via the LLM endpoint: {_deadlines(e['endpoint']['honoured_ms'])}"
        lines.append(text)
    if ep is not None:
        lines.append(
            f"  endpoint tier: network part of each round trip + the endpoint worker's measured"
            f" time per case (p50 {ep['p50_ms']:.0f} / p99 {ep['p99_ms']:.0f} ms, {ep['cases']}"
            f" cases, {ep['file']})"
        )
    else:
        lines.append(
            "  endpoint tier: not in this run (give --endpoint-latency FILE, the output of"
            " scripts/endpoint_roundtrip.py --json, to add the LLM endpoint's measured time)"
        )
    return lines
