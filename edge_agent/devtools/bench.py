"""``edge-agent bench``: what the agent costs here, next to the raw runtime and an all-cloud design.

Everything is measured in one run, on the same inputs (the bundled test
windows, repeated), after warm-up:

* **floor** — the raw runtime alone: ``InferenceSession.run`` on prepared
  arrays, batch 1 and batched;
* **naive** — what a user would write in thirty lines: ``json.loads``, numpy,
  ``session.run``, softmax, and a paho publish per reading;
* **agent** — edge-agent's decode → validate → score → route (with the real
  link and outbox behind it), one reading at a time and micro-batched; also
  from an already validated array, to separate decoding from scoring;
* **all-cloud** — every reading sent through a local mosquitto to the cloud
  worker and answered (the synchronous-API pattern), and the batch tier's
  throughput;
* **hybrid** — the real agent replaying the test data: its escalation rate;
* **routing** — the demo's loop (``edge-agent demo``) at noise 1.5, 2 and 3: the fixed
  threshold and the learned policy (after its warm-up) side by side, with escalations,
  accuracy edge only / hybrid / cloud only and monthly cost; ``--plot`` also writes a
  risk-coverage SVG per noise level;
* side effects — telemetry on vs off, cold start of ``edge-agent run`` to
  READY=1 and to the first decision, peak RSS and CPU time per reading of the
  agent process.

Ratios are taken between figures of the same run. The cost section prices
the measured escalation rate; the budget section checks each budget of the
design and says pass or fail with the measured value.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from edge_agent import __version__
from edge_agent.config import CloudSettings
from edge_agent.devtools.costs import budgets, cost_section
from edge_agent.devtools.demo import run_demo
from edge_agent.devtools.demo_report import write_risk_coverage
from edge_agent.devtools.floors import floor_onnx, json_floor
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.devtools.measure import (
    HYBRID_NOISE,
    agent_paths,
    agent_settings,
    agent_specs,
    all_cloud,
    hybrid,
    interleaved,
    load_lines,
    naive_onnx,
    telemetry_effect,
    windows_of,
)
from edge_agent.devtools.network import DEFAULT_PROFILES, network_section, parse_profiles
from edge_agent.devtools.processes import agent_process, cold_start, score_round_trip
from edge_agent.devtools.report import markdown, plot, table, write_markdown
from edge_agent.errors import EdgeAgentError
from edge_agent.models.pack import BUNDLED_TEST_DATA, ModelPack, discover, resolve
from edge_agent.scoring import backends
from edge_agent.scoring.backends.base import BackendOptions
from edge_agent.scoring.scorer import Scorer
from edge_agent.util.progress import Progress

__all__ = [
    "BenchOptions",
    "markdown",
    "plot",
    "plot_routing",
    "run_bench",
    "table",
    "write_markdown",
]

#: Sensor noise levels (x channel std) of the routing comparison (issue 21's levels).
ROUTING_NOISE = (1.5, 2.0, 3.0)

#: The cloud prices and token estimate of the config's defaults ([cloud]).
_CLOUD = CloudSettings()


@dataclass
class BenchOptions:
    quick: bool = False
    repeats: int = 0  #: passes over the test windows per measurement (0 = 50, or 5 with --quick)
    packs: list[str] = field(default_factory=list)
    data: Path = BUNDLED_TEST_DATA
    price_sync_per_1k_tokens: float = _CLOUD.price_sync_per_1k_tokens
    #: The low and high sync prices of the cost section's range.
    price_sync_low: float = 0.025
    price_sync_high: float = 0.06
    batch_discount: float = _CLOUD.batch_discount
    tokens_per_reading: int = _CLOUD.tokens_per_reading
    readings_per_second: float = 1.0
    sync_latency_ms: tuple[float, float] = (200.0, 300.0)
    progress: bool = True
    #: A cloud worker's ledger file (``cloud.ledger_path``) with endpoint requests in it: the
    #: cost section then also prices the measured tokens per request (``measured_tokens``).
    ledger: Path | None = None
    #: Network profiles of the network section, comma-separated (devtools/network.py); "none".
    network: str = ",".join(DEFAULT_PROFILES)
    #: ``scripts/endpoint_roundtrip.py --json`` output: the endpoint tier's measured time.
    endpoint_latency: Path | None = None

    @property
    def passes(self) -> int:
        return self.repeats or (5 if self.quick else 50)


# -- machine --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {"edge-agent": __version__, "python": platform.python_version()}
    for mod in ("onnxruntime", "numpy", "msgspec", "orjson", "psutil"):
        with contextlib.suppress(ImportError):
            versions[mod] = str(__import__(mod).__version__)
    versions["paho-mqtt"] = getattr(
        __import__("paho.mqtt", fromlist=["__version__"]), "__version__", "?"
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        from edge_agent.devtools.localbroker import mosquitto_path  # noqa: PLC0415

        out = subprocess.run(
            [mosquitto_path(), "-h"], capture_output=True, text=True, timeout=5, check=False
        )
        versions["mosquitto"] = (out.stdout or out.stderr).splitlines()[0].split()[-1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


# -- the run --------------------------------------------------------------------------


def _packs(opts: BenchOptions) -> Iterator[ModelPack]:
    if opts.packs:
        for ref in opts.packs:
            yield resolve(ref)
        return
    for pack in discover():
        if "cloud" in pack.manifest.name:
            continue
        if pack.manifest.backend == "onnx":
            yield pack
            continue
        # Other backends (llama.cpp) only when their runtime and files are installed here.
        try:
            backends.create(pack.manifest.backend)
            pack.verify()
        except EdgeAgentError as exc:
            sys.stderr.write(f"bench: skipping {pack.ref}: {exc}\n")
            continue
        yield pack


def _model_file_bytes(pack: ModelPack) -> int:
    """Size of the pack's largest file (the GGUF of a llama.cpp pack)."""
    return max(f.size for f in pack.manifest.files)


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    lines = load_lines(opts.data)
    x = windows_of(lines)
    networks = parse_profiles(opts.network)
    packs = list(_packs(opts))
    steps = 5 * len(packs) + 5 + len(ROUTING_NOISE) + len(networks)
    progress = Progress(steps, sys.stderr if opts.progress else None, plain_interval_s=0.0)
    results: dict[str, Any] = {"machine": machine_info(), "options": _opts_json(opts), "packs": {}}
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    broker = Mosquitto(work / "broker").start()
    try:
        for pack in packs:
            ref = pack.ref
            scorer = Scorer.open(pack, BackendOptions())
            entry: dict[str, Any] = {"backend": pack.manifest.backend}
            if pack.manifest.backend == "onnx":
                _onnx_paths(
                    entry,
                    pack,
                    scorer,
                    lines=lines,
                    x=x,
                    opts=opts,
                    work=work,
                    port=broker.port,
                    progress=progress,
                )
            else:
                progress.step(f"{ref}: (no raw floor for this backend)")
                progress.step(f"{ref}: (no JSON floor for this backend)")
                entry["process"] = score_round_trip(pack, lines, 100 if opts.quick else 400)
                entry["model_file_bytes"] = _model_file_bytes(pack)
                progress.step(f"{ref}: edge-agent score, one line at a time, from outside")
                # A reading through an LLM costs tens of ms: fewer passes keep the run short.
                entry["agent"] = agent_paths(
                    scorer, lines, x, min(opts.passes, 3), state=work / f"a-{ref}", port=broker.port
                )
                progress.step(f"{ref}: edge-agent paths")
            entry["accuracy"] = pack.manifest.metrics.get("accuracy_test")
            if pack.manifest.backend == "onnx":
                entry["ratios"] = ratios(entry)
            results["packs"][ref] = entry
            progress.step(f"{ref}: done")
            scorer.close()
        default = resolve()
        scorer = Scorer.open(default)
        results["telemetry"] = telemetry_effect(
            scorer, lines, opts.passes, work / "tel", broker.port
        )
        progress.step("telemetry on vs off")
        cloud_settings = agent_settings(work / "cloud", broker.port, "bench/cloud")
        results["all_cloud"] = all_cloud(cloud_settings, x, opts.passes)
        progress.step("all-cloud through mosquitto")
        results["network"] = network_section(opts, x, broker.port, work, progress)
        results["hybrid"] = {
            f"noise_{noise:g}": hybrid(
                scorer,
                opts.data,
                agent_settings(work / f"hyb{noise:g}", broker.port, f"bench/hybrid{i}"),
                noise,
            )
            for i, noise in enumerate(HYBRID_NOISE)
        }
        progress.step("hybrid: the real agent")
        scorer.close()
        results["cold_start"] = cold_start(
            default, work, broker.port, lines[0], 3 if opts.quick else 5
        )
        progress.step("cold start")
        results["process"] = agent_process(
            default, opts.data, work, broker.port, 5 if opts.quick else 50
        )
        progress.step("agent process: RSS and CPU")
        results["routing"] = routing_section(opts, progress)
    finally:
        broker.stop()
    results["cost"] = {name: cost_section(h, opts) for name, h in results["hybrid"].items()}
    results["budgets"] = budgets(results)
    return results


def _onnx_paths(
    entry: dict[str, Any],
    pack: ModelPack,
    scorer: Scorer,
    *,
    lines: list[bytes],
    x: np.ndarray,
    opts: BenchOptions,
    work: Path,
    port: int,
    progress: Progress,
) -> None:
    """An ONNX pack's raw run, JSON floor, naive integration and agent paths, into ``entry``:
    the parsers alone first (they pick the JSON floor's parser), then every path the budgets
    compare, timed in turn (``measure.interleaved``)."""
    ref = pack.ref
    floor = floor_onnx(pack, x, opts.passes)
    progress.step(f"{ref}: raw session.run prepared")
    entry["json_floor"], json_specs = json_floor(pack, lines, opts.passes)
    progress.step(f"{ref}: JSON parsers alone")
    naive, close_naive = naive_onnx(pack, lines, opts.passes, port)
    agent, finish = agent_specs(scorer, lines, x, opts.passes, state=work / f"a-{ref}", port=port)
    groups = {"floor": floor, "json_floor": json_specs, "agent": agent, "naive": {"": naive}}
    timed = interleaved(
        {f"{g}.{k}": spec for g, specs in groups.items() for k, spec in specs.items()}
    )
    close_naive()
    progress.step(f"{ref}: raw run, JSON floor, naive integration and agent paths, in turn")
    for g, specs in groups.items():
        got = {k: timed[f"{g}.{k}"] for k in specs}
        if g == "naive":
            entry[g] = got[""]
        else:
            entry.setdefault(g, {}).update(got)
    entry["agent"].update(finish())
    progress.step(f"{ref}: edge-agent paths")


def ratios(entry: dict[str, Any]) -> dict[str, float]:
    """Ratios of one ONNX pack's figures (all of one run), beyond those the budgets check:
    the agent from arrays and from JSON lines against the raw run and the parsers alone."""
    f, a, jf = entry["floor"], entry["agent"], entry["json_floor"]
    run99 = f["single"]["p99_ms"]
    parse = jf["parse"][jf["fastest_parse"]]
    return {
        "agent_frame_p99_over_floor_p99": a["frame"]["p99_ms"] / run99,
        "agent_array_p99_over_floor_p99": a["from_array"]["p99_ms"] / run99,
        "agent_line_p99_over_floor_p99": a["single"]["p99_ms"] / run99,
        "agent_line_p99_over_fastest_parse_p99": a["single"]["p99_ms"] / parse["p99_ms"],
        "agent_x64_per_line_over_fastest_parse_p50": a["batched"]["mean_ms"] / 64 / parse["p50_ms"],
        "agent_p99_over_naive_p99": a["single"]["p99_ms"] / entry["naive"]["p99_ms"],
        "agent_frames_x64_over_floor_x64_throughput": a["frames_batched"]["throughput_per_s"]
        / f["batched"]["throughput_per_s"],
    }


def _opts_json(opts: BenchOptions) -> dict[str, Any]:
    d = dict(opts.__dict__)
    d["data"] = str(opts.data)
    d["endpoint_latency"] = str(opts.endpoint_latency) if opts.endpoint_latency else None
    d["passes"] = opts.passes
    return d


def routing_section(opts: BenchOptions, progress: Progress) -> dict[str, Any]:
    out = {}
    for noise in ROUTING_NOISE:
        out[f"noise_{noise:g}"] = routing_comparison(opts, noise)
        progress.step(f"routing: fixed vs learned at noise {noise:g}")
    return out


def routing_comparison(opts: BenchOptions, noise: float) -> dict[str, Any]:
    """The demo's loop (its own broker, cloud worker and agents) with both policies."""
    args = SimpleNamespace(
        data=str(opts.data),
        loops=10,
        rate_hz=200.0,
        noise=noise,
        seed=0,
        readings_per_second=opts.readings_per_second,
        policy="both",
        warmup_loops=30,
        warmup_data=str(Path(opts.data).parent / "train.jsonl"),
        plot=None,
        keep=False,
        quiet=True,
    )
    return run_demo(args, None)


def plot_routing(results: dict[str, Any], path: Path) -> list[Path]:
    """One risk-coverage SVG per noise level of the routing comparison, next to ``path``."""
    out = []
    for name, summary in results.get("routing", {}).items():
        svg = path.with_name(f"{path.stem}-risk-coverage-{name}.svg")
        write_risk_coverage(svg, summary["policies"], summary["noise"])
        out.append(svg)
    return out
