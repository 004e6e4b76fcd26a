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
* side effects — telemetry on vs off, cold start of ``edge-agent run`` to
  READY=1 and to the first decision, peak RSS and CPU time per reading of the
  agent process.

Ratios are taken between figures of the same run. The cost section prices
the measured escalation rate; the budget section checks each budget of the
design and says pass or fail with the measured value.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import __version__, backends
from .agent import Agent
from .backends.base import BackendOptions
from .cloud import CloudWorker
from .config import Settings, load_settings
from .errors import EdgeAgentError
from .link import set_nodelay
from .localbroker import Mosquitto
from .messages import SCHEMA_VERSION, HardCase, LocalDecision, Verdict
from .modelpack import BUNDLED_TEST_DATA, ModelPack, discover, resolve
from .readings import Reading
from .scorer import Scorer
from .sources.replay import ReplaySource

SECONDS_PER_MONTH = 30 * 86400


@dataclass
class BenchOptions:
    quick: bool = False
    repeats: int = 0  #: passes over the test windows per measurement (0 = 50, or 5 with --quick)
    packs: list[str] = field(default_factory=list)
    data: Path = BUNDLED_TEST_DATA
    price_sync_per_1k_tokens: float = 0.04
    price_sync_low: float = 0.025
    price_sync_high: float = 0.06
    batch_discount: float = 0.5
    tokens_per_reading: int = 1500
    readings_per_second: float = 1.0
    sync_latency_ms: tuple[float, float] = (200.0, 300.0)
    progress: bool = True
    #: A cloud worker's ledger file (``cloud.ledger_path``) with endpoint requests in it: the
    #: cost section then also prices the measured tokens per request (``measured_tokens``).
    ledger: Path | None = None

    @property
    def passes(self) -> int:
        return self.repeats or (5 if self.quick else 50)


# -- statistics -----------------------------------------------------------------------


def stats(
    samples_ms: list[float], cpu_s: float | None = None, wall_s: float | None = None
) -> dict[str, Any]:
    """p50/p95/p99/mean of per-reading latencies, and throughput / CPU per reading."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    out: dict[str, Any] = {"n": int(arr.size)}
    if arr.size:
        p50, p95, p99 = np.percentile(arr, [50, 95, 99])
        out.update(
            p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99), mean_ms=float(arr.mean())
        )
    if wall_s:
        out["throughput_per_s"] = arr.size / wall_s if arr.size else 0.0
    if cpu_s is not None and arr.size:
        out["cpu_ms_per_reading"] = cpu_s * 1000.0 / arr.size
    return out


def timed(fn: Callable[[], object], n: int) -> dict[str, Any]:
    """Run ``fn`` n times; per-call latency, wall throughput and CPU per call."""
    samples = []
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return stats(samples, time.process_time() - cpu0, time.perf_counter() - wall0)


# -- inputs ---------------------------------------------------------------------------


def load_lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def windows_of(lines: list[bytes]) -> np.ndarray:
    rows = [json.loads(line)["values"] for line in lines]
    return np.asarray(rows, dtype=np.float32)


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            width = 24
            bar = "#" * int(width * self.done / self.total) + "-" * (
                width - int(width * self.done / self.total)
            )
            end = "\n" if not sys.stderr.isatty() or self.done == self.total else ""
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {what:<48}{end}")
            sys.stderr.flush()


# -- the measurements -----------------------------------------------------------------


def _raw_session(pack: ModelPack) -> Any:
    import onnxruntime as ort  # noqa: PLC0415 - only ONNX packs get here

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    model = next(f.path for f in pack.manifest.files if f.path.endswith(".onnx"))
    return ort.InferenceSession(
        str(pack.file(model)), sess_options=so, providers=["CPUExecutionProvider"]
    )


def floor_onnx(pack: ModelPack, x: np.ndarray, passes: int) -> dict[str, Any]:
    """The raw runtime: session.run on prepared arrays, batch 1 and batch 64."""
    sess = _raw_session(pack)
    m = pack.manifest
    outs = [m.outputs.probs] if m.outputs is not None else None
    name = m.input.name
    singles = [x[i : i + 1] for i in range(len(x))]
    for s in singles[:10]:
        sess.run(outs, {name: s})
    it = iter(singles * passes)
    single = timed(lambda: sess.run(outs, {name: next(it)}), len(singles) * passes)
    big = np.concatenate([x] * max(1, 64 // len(x) + 1))[:64]
    sess.run(outs, {name: big})
    n_batches = max(10, passes * len(x) // 64)
    batch = timed(lambda: sess.run(outs, {name: big}), n_batches)
    batch["throughput_per_s"] = 64 * n_batches / (batch["mean_ms"] * n_batches / 1000.0)
    batch["batch"] = 64
    return {"single": single, "batched": batch}


def naive_onnx(pack: ModelPack, lines: list[bytes], passes: int, port: int) -> dict[str, Any]:
    """Thirty lines a user would write: json.loads, numpy, session.run, softmax, publish."""
    sess = _raw_session(pack)
    m = pack.manifest
    out_name = m.outputs.logits if m.outputs is not None and m.outputs.logits else None
    labels = m.labels
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()

    def one(line: bytes) -> None:
        obj = json.loads(line)
        x = np.array(obj["values"], dtype=np.float32)[None]
        logits = sess.run([out_name] if out_name else None, {m.input.name: x})[0][0]
        e = np.exp(logits - logits.max())
        p = e / e.sum()
        k = int(p.argmax())
        decision = {"id": obj.get("id"), "label": labels[k], "confidence": float(p[k])}
        client.publish("bench/naive/decision", json.dumps(decision))

    for line in lines[:10]:
        one(line)
    it = iter(lines * passes)
    result = timed(lambda: one(next(it)), len(lines) * passes)
    client.loop_stop()
    client.disconnect()
    return result


def _agent_settings(state: Path, port: int, prefix: str, **extra: str) -> Settings:
    env = {
        "EDGE_AGENT_DEVICE_ID": "bench",
        "EDGE_AGENT_DEVICE_STATE_DIR": str(state),
        "EDGE_AGENT_MQTT_PORT": str(port),
        "EDGE_AGENT_MQTT_TOPIC_PREFIX": prefix,
        "EDGE_AGENT_TELEMETRY_PUBLISH": "false",
    }
    env.update({f"EDGE_AGENT_{k.upper()}": v for k, v in extra.items()})
    return load_settings(None, env=env)


def agent_paths(
    scorer: Scorer, lines: list[bytes], x: np.ndarray, passes: int, *, state: Path, port: int
) -> dict[str, Any]:
    """The agent's own path: per line, micro-batched, and from validated arrays."""
    settings = _agent_settings(state, port, "bench/agent")
    agent = Agent(settings, scorer)
    agent.link.start()
    process = agent.pipeline.process
    for line in lines[:10]:
        process([line])
    it = iter(lines * passes)
    single = timed(lambda: process([next(it)]), len(lines) * passes)
    group = (lines * (64 // len(lines) + 1))[:64]
    n_groups = max(10 if passes > 3 else 1, passes * len(lines) // 64)
    batched = timed(lambda: process(group), n_groups)
    batched["throughput_per_s"] = 64 * n_groups / (batched["mean_ms"] * n_groups / 1000.0)
    batched["batch"] = 64
    readings = [Reading(values=w) for w in x]
    route = agent._route  # the same routing the pipeline calls

    def score_route(r: Reading) -> None:
        for d in scorer.score([r]):
            route(d)

    itr = iter(readings * passes)
    from_array = timed(lambda: score_route(next(itr)), len(readings) * passes)
    group_r = (readings * (64 // len(readings) + 1))[:64]

    def score_route_group() -> None:
        for d in scorer.score(group_r):
            route(d)

    from_array_batched = timed(score_route_group, n_groups)
    from_array_batched["throughput_per_s"] = 64 / (from_array_batched["mean_ms"] / 1000.0)
    from_array_batched["batch"] = 64
    agent.close()
    hard_rate = agent.pipeline.counts["hard"] / max(
        1, agent.pipeline.counts["hard"] + agent.pipeline.counts["local"]
    )
    return {
        "single": single,
        "batched": batched,
        "from_array": from_array,
        "from_array_batched": from_array_batched,
        "hard_rate": hard_rate,
    }


def telemetry_effect(
    scorer: Scorer, lines: list[bytes], passes: int, state: Path, port: int
) -> dict[str, Any]:
    """p99 of the per-line path with an aggressive telemetry thread vs none, interleaved."""
    results: dict[str, list[float]] = {"off": [], "on": []}
    for block in range(6):
        mode = "on" if block % 2 else "off"
        extra = (
            {"telemetry_interval_s": "0.05", "telemetry_publish": "true"} if mode == "on" else {}
        )
        settings = _agent_settings(state / f"t{block}", port, f"bench/telemetry{block}", **extra)
        agent = Agent(settings, scorer)
        agent.link.start()
        if mode == "on":
            agent.telemetry.start()
        it = iter(lines * max(1, passes // 3))
        for _ in range(len(lines) * max(1, passes // 3)):
            t0 = time.perf_counter_ns()
            agent.pipeline.process([next(it)])
            results[mode].append((time.perf_counter_ns() - t0) / 1e6)
        agent.close()
    off, on = stats(results["off"]), stats(results["on"])
    return {"off": off, "on": on, "p99_ratio": on["p99_ms"] / off["p99_ms"]}


class _CloudClient:
    """A synchronous-API client: publish one hard case, wait for its verdict."""

    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.event = threading.Event()
        self.answer: Verdict | None = None
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_a: set_nodelay(c)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{prefix}/bench/verdict/#", qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if b'"verdicts"' not in msg.payload:
            self.answer = msgspec.json.decode(msg.payload, type=Verdict)
        self.event.set()

    def ask(self, case: HardCase) -> Verdict | None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"{self.prefix}/bench/verdict"
        props.CorrelationData = case.key.encode()
        props.UserProperty = [("idempotency-key", case.key)]
        self.event.clear()
        self.client.publish(
            f"{self.prefix}/bench/hard", msgspec.json.encode(case), qos=1, properties=props
        )
        if not self.event.wait(5):
            return None
        return self.answer

    def batch(self, cases: list[HardCase]) -> bool:
        self.event.clear()
        body = msgspec.json.encode({"v": SCHEMA_VERSION, "device": "bench", "cases": cases})
        self.client.publish(f"{self.prefix}/bench/batch", body, qos=1)
        return self.event.wait(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def all_cloud(settings: Settings, x: np.ndarray, passes: int, port: int) -> dict[str, Any]:
    """Every reading sent to the cloud worker and answered; and the batch tier's throughput."""
    worker = CloudWorker(settings)
    worker.start()
    if not worker.ready.wait(10):
        raise RuntimeError("the benchmark's cloud worker did not subscribe")
    client = _CloudClient(port, settings.mqtt.topic_prefix)
    local = LocalDecision("unknown", 0.0, None, "none")
    values = [w.tolist() for w in x]
    seq = 0

    def case(i: int, tier: str) -> HardCase:
        nonlocal seq
        seq += 1
        return HardCase(
            v=SCHEMA_VERSION,
            key=f"bench:{seq}",
            device="bench",
            seq=seq,
            values=values[i % len(values)],
            local=local,
            tier=tier,  # type: ignore[arg-type]
        )

    for i in range(10):
        client.ask(case(i, "urgent"))
    rtt, broker_only = [], []
    n = len(values) * max(1, passes // 5)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter_ns()
        v = client.ask(case(i, "urgent"))
        total = (time.perf_counter_ns() - t0) / 1e6
        if v is not None:
            rtt.append(total)
            broker_only.append(max(0.0, total - v.cloud_ms))
    sync = stats(rtt, time.process_time() - cpu0, time.perf_counter() - wall0)
    sync["lost"] = n - len(rtt)
    size = 200
    n_batches = 3 if passes <= 5 else 10
    t0w = time.perf_counter()
    ok = sum(client.batch([case(i, "batch") for i in range(size)]) for _ in range(n_batches))
    wall = time.perf_counter() - t0w
    client.close()
    cloud_model = worker.scorer.ref
    worker.stop()
    return {
        "sync": sync,
        "round_trip_excluding_cloud_model": stats(broker_only),
        "batch": {"cases_per_s": ok * size / wall, "batch_size": size, "batches": ok},
        "cloud_model": cloud_model,
    }


HYBRID_NOISE = (0.0, 1.5)  #: sensor noise levels (x channel std) of the hybrid runs


def hybrid(scorer: Scorer, data: Path, settings: Settings, noise: float) -> dict[str, Any]:
    """The real agent replaying the test data (with sensor noise) through the whole loop."""
    worker = CloudWorker(settings)
    worker.start()
    worker.ready.wait(10)
    agent = Agent(settings, scorer)
    source = ReplaySource(
        str(data),
        settings.input.max_line_bytes,
        rate_hz=0,
        loops=5,
        noise=noise,
        seed=0,
        batch=settings.model.max_batch,
    )
    agent.run(source, exit_when_drained=True, drain_timeout_s=30)
    worker.stop()
    snap = agent.summary()
    n = max(1, snap["readings"])
    return {
        "noise": noise,
        "readings": snap["readings"],
        "escalation_rate": (snap["hard_urgent"] + snap["hard_batch"]) / n,
        "urgent_rate": snap["hard_urgent"] / n,
        "batch_rate": snap["hard_batch"] / n,
        "latency_ms_p50": snap["latency_ms_p50"],
        "latency_ms_p99": snap["latency_ms_p99"],
        "round_trip_ms_p50": snap["round_trip_ms_p50"],
        "round_trip_ms_p99": snap["round_trip_ms_p99"],
        "agreement": snap["agreement"],
    }


class _PeakRss:
    """Samples a child's VmHWM (peak RSS of its own image, after exec) until it exits.

    ``ru_maxrss`` from wait4 is not used: on Linux it also counts the pages of the
    forked copy of this (large) benchmark process from before the exec.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(1)
        return self.peak


def _edge_agent_cmd() -> list[str]:
    return [sys.executable, "-m", "edge_agent"]


def cold_start(pack: ModelPack, state: Path, port: int, line: bytes, runs: int) -> dict[str, Any]:
    """``edge-agent run``: process start → READY=1 and → first decision, peak RSS, CPU."""
    ready, first, rss, cpu = [], [], [], []
    for i in range(runs):
        sock_path = state / f"notify{i}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(sock_path))
        notify.settimeout(30)
        env = dict(os.environ)
        env.update(
            {
                "NOTIFY_SOCKET": str(sock_path),
                "EDGE_AGENT_MODEL_PACK": str(pack.path),
                "EDGE_AGENT_DEVICE_STATE_DIR": str(state / f"cold{i}"),
                "EDGE_AGENT_MQTT_PORT": str(port),
                "EDGE_AGENT_MQTT_TOPIC_PREFIX": "bench/cold",
                "EDGE_AGENT_DEVICE_ID": "bench-cold",
            }
        )
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [
                *_edge_agent_cmd(),
                "run",
                "--decisions",
                "--exit-when-drained",
                "--drain-timeout",
                "5",
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        if proc.stdin is None or proc.stdout is None:  # pragma: no cover - PIPE above
            raise RuntimeError("no pipes to the agent")
        sampler = _PeakRss(proc.pid)
        msg = notify.recv(4096)
        ready.append(time.perf_counter() - t0 if msg.startswith(b"READY=1") else float("nan"))
        proc.stdin.write(line + b"\n")
        proc.stdin.flush()
        proc.stdout.readline()
        first.append(time.perf_counter() - t0)
        sampler.sample()  # one last sample while the process is alive
        proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        notify.close()
        rss.append(sampler.stop())
        cpu.append(usage.ru_utime + usage.ru_stime)
    return {
        "ready_s": float(np.median(ready)),
        "first_decision_s": float(np.median(first)),
        "runs": runs,
        "peak_rss_bytes": int(max(rss)),
        "process_cpu_s": float(np.median(cpu)),
    }


def score_round_trip(
    pack: ModelPack, lines: list[bytes], n: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``edge-agent score`` as a child process, one line at a time, timed from outside.

    Each round trip is one line written to its stdin until its decision line is read from its
    stdout: decoding, validation, scoring and encoding included, start-up not. Also the child's
    peak RSS. ``env`` adds to the environment (e.g. ``LLAMA_CPP_LIB_PATH``, another build).
    """
    proc = subprocess.Popen(
        [*_edge_agent_cmd(), "score", "--model", str(pack.path), "-q", "-"],
        env={**os.environ, **(env or {})},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    if proc.stdin is None or proc.stdout is None:  # pragma: no cover - PIPE above
        raise RuntimeError("no pipes to the scoring process")
    sampler = _PeakRss(proc.pid)
    samples: list[float] = []
    try:
        for i in range(n + 1):
            t0 = time.perf_counter_ns()
            proc.stdin.write(lines[i % len(lines)] + b"\n")
            proc.stdin.flush()
            if not proc.stdout.readline():
                raise RuntimeError(f"edge-agent score --model {pack.ref} ended early")
            if i:  # the first line waits for the model to load
                samples.append((time.perf_counter_ns() - t0) / 1e6)
        sampler.sample()
    finally:
        proc.stdin.close()
        proc.wait(60)
        proc.stdout.close()
    return stats(samples) | {"peak_rss_bytes": sampler.stop()}


def _model_file_bytes(pack: ModelPack) -> int:
    """Size of the pack's largest file (the GGUF of a llama.cpp pack)."""
    return max(f.size for f in pack.manifest.files)


def agent_process(
    pack: ModelPack, data: Path, state: Path, port: int, loops: int
) -> dict[str, Any]:
    """A whole ``edge-agent run`` over the replayed test data: peak RSS and CPU per reading."""
    n_lines = len(load_lines(data))
    env = dict(os.environ)
    env.update(
        {
            "EDGE_AGENT_MODEL_PACK": str(pack.path),
            "EDGE_AGENT_DEVICE_STATE_DIR": str(state / "proc"),
            "EDGE_AGENT_MQTT_PORT": str(port),
            "EDGE_AGENT_MQTT_TOPIC_PREFIX": "bench/proc",
            "EDGE_AGENT_DEVICE_ID": "bench-proc",
            "EDGE_AGENT_SOURCE_KIND": "replay",
            "EDGE_AGENT_SOURCE_PATH": str(data),
            "EDGE_AGENT_SOURCE_LOOPS": str(loops),
        }
    )
    proc = subprocess.Popen(
        [*_edge_agent_cmd(), "run", "--exit-when-drained", "--drain-timeout", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sampler = _PeakRss(proc.pid)
    _, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    readings = n_lines * loops
    return {
        "readings": readings,
        "peak_rss_bytes": sampler.stop(),
        "cpu_ms_per_reading_incl_startup": (usage.ru_utime + usage.ru_stime) * 1000 / readings,
    }


# -- cost and budgets -----------------------------------------------------------------


def measured_tokens(ledger_file: Path) -> dict[str, Any]:
    """Mean tokens per endpoint request and the prices, from a cloud worker's ledger file."""
    try:
        data = json.loads(ledger_file.read_text())
        pricing = data["pricing"]
        total = data["total"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeAgentError(f"{ledger_file}: not a cloud ledger file: {exc}") from exc
    if not pricing.get("tokens_measured"):
        raise EdgeAgentError(f"{ledger_file}: no endpoint request was billed in this ledger")
    return {
        "ledger": str(ledger_file),
        "requests": total["calls"],
        "mean_prompt_tokens": pricing["mean_prompt_tokens"],
        "mean_completion_tokens": pricing["mean_completion_tokens"],
        "price_prompt_per_1k": pricing["price_prompt_per_1k"],
        "price_completion_per_1k": pricing["price_completion_per_1k"],
        "batch_price_factor": pricing["batch_price_factor"],
        "unit_price_urgent": pricing["unit_price_urgent"],
        "unit_price_batch": pricing["unit_price_batch"],
    }


def cost_section(escalation: dict[str, float], opts: BenchOptions) -> dict[str, Any]:
    """Monthly cost of all-cloud sync, all-cloud batch and the hybrid at the measured rates."""
    monthly = opts.readings_per_second * SECONDS_PER_MONTH
    tokens = opts.tokens_per_reading

    def unit(price_per_1k: float, discount: float = 0.0) -> float:
        return tokens / 1000.0 * price_per_1k * (1.0 - discount)

    out: dict[str, Any] = {
        "readings_per_month": monthly,
        "tokens_per_reading": tokens,
        "batch_discount": opts.batch_discount,
        "sync_latency_ms_reference": list(opts.sync_latency_ms),
        "scenarios": {},
    }
    for name, price in (
        ("low", opts.price_sync_low),
        ("default", opts.price_sync_per_1k_tokens),
        ("high", opts.price_sync_high),
    ):
        u_sync, u_batch = unit(price), unit(price, opts.batch_discount)
        hybrid = monthly * (escalation["urgent_rate"] * u_sync + escalation["batch_rate"] * u_batch)
        out["scenarios"][name] = {
            "price_sync_per_1k_tokens": price,
            "all_cloud_sync": monthly * u_sync,
            "all_cloud_batch": monthly * u_batch,
            "hybrid": hybrid,
            "hybrid_vs_sync": hybrid / (monthly * u_sync) if u_sync else None,
        }
    if opts.ledger is not None:
        m = measured_tokens(opts.ledger)
        u_sync, u_batch = m["unit_price_urgent"], m["unit_price_batch"]
        hybrid = monthly * (escalation["urgent_rate"] * u_sync + escalation["batch_rate"] * u_batch)
        out["measured"] = m
        out["scenarios"]["measured"] = {
            "price_sync_per_1k_tokens": "measured",
            "all_cloud_sync": monthly * u_sync,
            "all_cloud_batch": monthly * u_batch,
            "hybrid": hybrid,
            "hybrid_vs_sync": hybrid / (monthly * u_sync) if u_sync else None,
        }
    return out


def budgets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each budget of the design, with the measured value and pass/fail."""
    out: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, unit: str, note: str = "") -> None:
        ok = value is not None and math.isfinite(value) and value <= limit
        out.append(
            {
                "budget": name,
                "value": value,
                "limit": limit,
                "unit": unit,
                "pass": bool(ok),
                "note": note,
            }
        )

    for ref, p in results["packs"].items():
        if p["backend"] == "onnx":
            floor_p99 = p["floor"]["single"]["p99_ms"]
            check(
                f"{ref}: agent p99 per line / raw run p99",
                p["agent"]["single"]["p99_ms"] / floor_p99,
                1.5,
                "x",
                "from a JSON line: includes decoding and validating 600 numbers",
            )
            check(
                f"{ref}: agent p99 from a validated array / raw run p99",
                p["agent"]["from_array"]["p99_ms"] / floor_p99,
                1.5,
                "x",
                "score + OOD guard + route",
            )
            check(
                f"{ref}: raw batched throughput / agent micro-batched throughput",
                p["floor"]["batched"]["throughput_per_s"]
                / p["agent"]["batched"]["throughput_per_s"],
                2.0,
                "x",
                "agent >= 0.5x raw batched; from JSON lines: includes decoding",
            )
            check(
                f"{ref}: raw batched throughput / agent micro-batched from arrays",
                p["floor"]["batched"]["throughput_per_s"]
                / p["agent"]["from_array_batched"]["throughput_per_s"],
                2.0,
                "x",
                "score + OOD guard + route, 64 at a time",
            )
            check(
                f"{ref}: agent p99 per line (absolute)", p["agent"]["single"]["p99_ms"], 50.0, "ms"
            )
            check(
                f"{ref}: agent p99 / naive p99",
                p["agent"]["single"]["p99_ms"] / p["naive"]["p99_ms"],
                1.0,
                "x",
                "agent faster than the naive integration",
            )
        else:
            check(
                f"{ref}: p95 per reading, from outside the process",
                p["process"].get("p95_ms"),
                50.0,
                "ms",
                "one line at a time through `edge-agent score`",
            )
            check(
                f"{ref}: peak RSS / (model file x 2.5 + 100 MB)",
                p["process"]["peak_rss_bytes"] / (p["model_file_bytes"] * 2.5 + 100 * 2**20),
                1.0,
                "x",
            )
    proc = results.get("process", {})
    if proc:
        check("ONNX agent peak RSS", proc["peak_rss_bytes"] / 2**20, 150.0, "MiB")
    cold = results.get("cold_start", {})
    if cold:
        check("cold start to READY=1 (ONNX)", cold["ready_s"], 1.5, "s")
    cloud = results.get("all_cloud", {})
    if cloud:
        check(
            "hard-case round trip p99, excluding the cloud model",
            cloud["round_trip_excluding_cloud_model"].get("p99_ms"),
            5.0,
            "ms",
        )
    tel = results.get("telemetry", {})
    if tel:
        check("p99 with telemetry on / off", tel["p99_ratio"], 1.1, "x")
    return out


# -- machine --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {"edge-agent": __version__, "python": platform.python_version()}
    for mod in ("onnxruntime", "numpy", "msgspec", "psutil"):
        with contextlib.suppress(ImportError):
            versions[mod] = str(__import__(mod).__version__)
    versions["paho-mqtt"] = getattr(
        __import__("paho.mqtt", fromlist=["__version__"]), "__version__", "?"
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        from .localbroker import mosquitto_path  # noqa: PLC0415

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


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    lines = load_lines(opts.data)
    x = windows_of(lines)
    packs = list(_packs(opts))
    steps = 4 * len(packs) + 5
    progress = _Progress(steps, opts.progress)
    results: dict[str, Any] = {"machine": machine_info(), "options": _opts_json(opts), "packs": {}}
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    broker = Mosquitto(work / "broker").start()
    try:
        for pack in packs:
            ref = pack.ref
            scorer = Scorer.open(pack, BackendOptions())
            entry: dict[str, Any] = {"backend": pack.manifest.backend}
            if pack.manifest.backend == "onnx":
                entry["floor"] = floor_onnx(pack, x, opts.passes)
                progress.step(f"{ref}: raw session.run")
                entry["naive"] = naive_onnx(pack, lines, opts.passes, broker.port)
                progress.step(f"{ref}: naive integration")
            else:
                progress.step(f"{ref}: (no raw floor for this backend)")
                entry["process"] = score_round_trip(pack, lines, 100 if opts.quick else 400)
                entry["model_file_bytes"] = _model_file_bytes(pack)
                progress.step(f"{ref}: edge-agent score, one line at a time, from outside")
            # A reading through an LLM costs tens of ms: fewer passes keep the run short.
            passes = opts.passes if pack.manifest.backend == "onnx" else min(opts.passes, 3)
            entry["agent"] = agent_paths(
                scorer, lines, x, passes, state=work / f"a-{ref}", port=broker.port
            )
            progress.step(f"{ref}: edge-agent paths")
            entry["accuracy"] = pack.manifest.metrics.get("accuracy_test")
            if pack.manifest.backend == "onnx":
                f, a, nv = entry["floor"], entry["agent"], entry["naive"]
                entry["ratios"] = {
                    "agent_p99_over_floor_p99": a["single"]["p99_ms"] / f["single"]["p99_ms"],
                    "agent_array_p99_over_floor_p99": a["from_array"]["p99_ms"]
                    / f["single"]["p99_ms"],
                    "agent_p99_over_naive_p99": a["single"]["p99_ms"] / nv["p99_ms"],
                    "agent_batched_over_floor_batched_throughput": a["batched"]["throughput_per_s"]
                    / f["batched"]["throughput_per_s"],
                }
            results["packs"][ref] = entry
            progress.step(f"{ref}: done")
            scorer.close()
        default = resolve()
        scorer = Scorer.open(default)
        results["telemetry"] = telemetry_effect(
            scorer, lines, opts.passes, work / "tel", broker.port
        )
        progress.step("telemetry on vs off")
        cloud_settings = _agent_settings(work / "cloud", broker.port, "bench/cloud")
        results["all_cloud"] = all_cloud(cloud_settings, x, opts.passes, broker.port)
        progress.step("all-cloud through mosquitto")
        results["hybrid"] = {
            f"noise_{noise:g}": hybrid(
                scorer,
                opts.data,
                _agent_settings(work / f"hyb{noise:g}", broker.port, f"bench/hybrid{i}"),
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
    finally:
        broker.stop()
    results["cost"] = {name: cost_section(h, opts) for name, h in results["hybrid"].items()}
    results["budgets"] = budgets(results)
    return results


def _opts_json(opts: BenchOptions) -> dict[str, Any]:
    d = dict(opts.__dict__)
    d["data"] = str(opts.data)
    d["passes"] = opts.passes
    return d


# -- output ---------------------------------------------------------------------------


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(results: dict[str, Any]) -> str:
    rows = [("pattern", "p50 ms", "p95 ms", "p99 ms", "per s", "CPU ms/rd")]
    for ref, p in results["packs"].items():
        named = []
        if "floor" in p:
            named += [
                (f"{ref} raw run (floor)", p["floor"]["single"]),
                (f"{ref} raw run x64", p["floor"]["batched"]),
            ]
        if "naive" in p:
            named.append((f"{ref} naive integration", p["naive"]))
        if "process" in p:
            named.append((f"{ref} `score` process, from outside", p["process"]))
        named += [
            (f"{ref} edge-agent per line", p["agent"]["single"]),
            (f"{ref} edge-agent x64", p["agent"]["batched"]),
            (f"{ref} edge-agent from array", p["agent"]["from_array"]),
            (f"{ref} edge-agent from array x64", p["agent"]["from_array_batched"]),
        ]
        for name, s in named:
            per = s.get("throughput_per_s")
            rows.append(
                (
                    name,
                    _f(s.get("p50_ms")),
                    _f(s.get("p95_ms")),
                    _f(s.get("p99_ms")),
                    _f(per, 0) if per else "-",
                    _f(s.get("cpu_ms_per_reading"), 4),
                )
            )
    c = results["all_cloud"]
    rows.append(
        (
            "all-cloud sync (mosquitto + cloud worker)",
            _f(c["sync"].get("p50_ms")),
            _f(c["sync"].get("p95_ms")),
            _f(c["sync"].get("p99_ms")),
            _f(c["sync"].get("throughput_per_s"), 0),
            _f(c["sync"].get("cpu_ms_per_reading"), 4),
        )
    )
    rows.append(("all-cloud batch tier", "-", "-", "-", _f(c["batch"]["cases_per_s"], 0), "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    for h in results["hybrid"].values():
        lines.append(
            f"hybrid, test data with noise {h['noise']:g} x std: escalation"
            f" {100 * h['escalation_rate']:.1f}% (urgent {100 * h['urgent_rate']:.1f}%,"
            f" batch {100 * h['batch_rate']:.1f}%), agreement {_f(h['agreement'])},"
            f" device round trip p50 {_f(h['round_trip_ms_p50'])} / p99"
            f" {_f(h['round_trip_ms_p99'])} ms"
        )
    lines += [
        f"telemetry on/off p99: {_f(results['telemetry']['p99_ratio'])}x;"
        f" cold start READY=1 {_f(results['cold_start']['ready_s'])} s, first decision"
        f" {_f(results['cold_start']['first_decision_s'])} s; agent peak RSS"
        f" {results['process']['peak_rss_bytes'] / 2**20:.1f} MiB",
        "",
        "monthly cost per device at "
        f"{results['options']['readings_per_second']:g} reading/s"
        f" ({results['options']['tokens_per_reading']} tokens/reading):",
    ]
    for hname, cost in results["cost"].items():
        for name, s in cost["scenarios"].items():
            price = s["price_sync_per_1k_tokens"]
            lines.append(
                f"  {hname:<10} {name:<8} {'tokens' if price == 'measured' else f'${price}/1K'}:"
                f" all-cloud sync ${s['all_cloud_sync']:,.0f},"
                f" batch ${s['all_cloud_batch']:,.0f}, hybrid ${s['hybrid']:,.0f}"
            )
        m = cost.get("measured")
        if m is not None:
            lines.append(
                f"  {hname:<10} measured: {m['requests']} endpoint requests in {m['ledger']},"
                f" {m['mean_prompt_tokens']:.1f} prompt + {m['mean_completion_tokens']:.1f}"
                f" completion tokens each (${m['price_prompt_per_1k']}/1K prompt,"
                f" ${m['price_completion_per_1k']}/1K completion, batch x"
                f"{m['batch_price_factor']})"
            )
    lines += ["", "budgets:"]
    for b in results["budgets"]:
        lines.append(
            f"  {'PASS' if b['pass'] else 'FAIL'}  {b['budget']}:"
            f" {_f(b['value'])} {b['unit']} (limit {b['limit']})"
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any], command: str) -> str:
    m = results["machine"]
    out = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {m['cpu']}"
        f" ({m['cores']} cores, {m['machine']}, {m['system']}),"
        f" versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.",
        "Every figure below comes from that one run; ratios compare figures of the same run.",
        "",
        "```",
        table(results).rstrip(),
        "```",
        "",
    ]
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names, p50, p99 = [], [], []
    for ref, p in results["packs"].items():
        for label, s in (
            ("floor", p.get("floor", {}).get("single")),
            ("naive", p.get("naive")),
            ("agent", p["agent"]["single"]),
        ):
            if s:
                names.append(f"{ref}\n{label}")
                p50.append(s["p50_ms"])
                p99.append(s["p99_ms"])
    c = results["all_cloud"]["sync"]
    names.append("all-cloud\nsync")
    p50.append(c["p50_ms"])
    p99.append(c["p99_ms"])
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.2), 4))
    idx = np.arange(len(names))
    ax.bar(idx - 0.2, p50, 0.4, label="p50")
    ax.bar(idx + 0.2, p99, 0.4, label="p99")
    ax.set_yscale("log")
    ax.set_ylabel("ms per reading (log)")
    ax.set_xticks(idx, names, fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
