"""The cloud tier against a real OpenAI-compatible endpoint: llama-cpp-python's own server.

The server (``tests/llama_server.py``) serves the SmolLM2 GGUF on a free loopback port; a small
loopback proxy (``tests/fault_proxy.py``) in front of it injects 429, 500, stalls and garbage,
and goes down. The devices are a plain paho client or the real agent, through a real mosquitto.

SmolLM2-135M does not classify sensor statistics (it mostly does not even answer with one of
the labels: see ``test_the_shipped_prompt_...``), so the loop tests use a copy of the shipped
pack whose prompt asks the model to repeat the device's local label — which it does. What is
tested is the protocol, strict parsing, accounting and fault handling, not accuracy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge_agent.cloud.ledger_store import summary_of
from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import Settings, load_settings
from edge_agent.ingest.sources.replay import ReplaySource
from edge_agent.models.pack import resolve
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from edge_agent.wire.messages import BatchVerdicts, Verdict
from tests.broker import Mosquitto
from tests.conftest import MODELS, TEST_JSONL, settings_env
from tests.fault_proxy import FaultProxy
from tests.integration.test_cloud import Devices, devices, hard_case, running, wait_until

__all__ = ["devices"]  # the fixture, shared with test_cloud.py
from tests.llama_server import API_KEY, MODEL_ALIAS, LlamaServer

pytestmark = [pytest.mark.integration, pytest.mark.llm]

SHIPPED = MODELS / "basicmotions-cloud-endpoint"
ECHO_PROMPT = """[prompt]
system = "You answer with a single word."
user = "Say the word: $local_label"
max_tokens = 4
temperature = 0.0
stop = ["\\n"]
"""
WINDOWS = [json.loads(line)["values"] for line in TEST_JSONL.read_text().splitlines()[:8]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(tmp_path_factory.mktemp("llama")).start()
    yield server
    server.stop()


@pytest.fixture
def proxy(llama: LlamaServer) -> Iterator[FaultProxy]:
    p = FaultProxy(llama.port).start()
    yield p
    p.stop()


@pytest.fixture
def echo_pack(tmp_path: Path) -> Path:
    """The shipped endpoint pack with a prompt SmolLM2 can follow: repeat the local label."""
    folder = tmp_path / "echo-pack"
    folder.mkdir()
    text = (SHIPPED / "manifest.toml").read_text()
    text = text[: text.index("[prompt]")] + ECHO_PROMPT
    (folder / "manifest.toml").write_text(text.replace("basicmotions-cloud-endpoint", "echo"))
    return folder


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-key"
    path.write_text(API_KEY + "\n")
    return path


def endpoint_env(base_url: str, pack: Path, key: Path, **extra: str) -> dict[str, str]:
    env = {
        "EDGE_AGENT_CLOUD_BACKEND": "endpoint",
        "EDGE_AGENT_CLOUD_PACK": str(pack),
        "EDGE_AGENT_ENDPOINT_BASE_URL": base_url,
        "EDGE_AGENT_ENDPOINT_MODEL": MODEL_ALIAS,
        "EDGE_AGENT_ENDPOINT_API_KEY_FILE": str(key),
        "EDGE_AGENT_ENDPOINT_BACKOFF_MIN_S": "0.05",
        "EDGE_AGENT_ENDPOINT_BACKOFF_MAX_S": "0.2",
        "EDGE_AGENT_ENDPOINT_PRICE_PROMPT_PER_1K": "0.5",
        "EDGE_AGENT_ENDPOINT_PRICE_COMPLETION_PER_1K": "1.5",
    }
    env.update({f"EDGE_AGENT_{k.upper()}": v for k, v in extra.items()})
    return env


def worker_settings(
    broker: Mosquitto, prefix: str, base_url: str, pack: Path, key: Path, **extra: str
) -> Settings:
    env = {
        "EDGE_AGENT_MQTT_PORT": str(broker.port),
        "EDGE_AGENT_MQTT_TOPIC_PREFIX": prefix,
        "EDGE_AGENT_MQTT_KEEPALIVE_S": "5",
        "EDGE_AGENT_CLOUD_GROUP": "pool",
        "EDGE_AGENT_CLOUD_WORKER_ID": "w1",
        **endpoint_env(base_url, pack, key, **extra),
    }
    return load_settings(None, env=env)


def urgent(seq: int, deadline_ms: float = 5000.0, window: int = 0, label: str = "walking") -> Any:
    case = hard_case("dev-1", seq, WINDOWS[window % len(WINDOWS)])
    local = msgspec.structs.replace(case.local, label=label)
    return msgspec.structs.replace(case, local=local, deadline_ms=deadline_ms)


def verdict_of(devices: Devices, timeout: float = 15.0) -> tuple[Verdict, float]:
    got = devices.receive(timeout)
    return msgspec.json.decode(got.payload, type=Verdict), got.t_ns / 1e9


# -- the whole loop ---------------------------------------------------------------------


def test_hard_cases_from_the_agent_get_verdicts_from_the_endpoint(
    broker: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
    llama: LlamaServer,
    echo_pack: Path,
    key_file: Path,
) -> None:
    """Agent (default pack) → mosquitto → cloud worker → llama.cpp server → verdicts back."""
    env = settings_env(
        broker.port,
        topic_prefix,
        tmp_path / "state",
        router_cooldown_s="0",
        router_max_urgent_per_minute="100000",
        router_urgent_below="0.9",
        router_deadline_ms="10000",
        link_batch_max_wait_s="0.2",
        cloud_ledger_path=str(tmp_path / "ledger.db"),
    )
    # The deadline is the behaviour under test: whatever the endpoint does, the worker answers
    # by deadline - margin, so no urgent case is missed on the device. The margin is the time
    # left for the answer's way back through the broker; on a 2-core machine that also runs
    # the LLM server (2 threads) that can take far more than the 50 ms default, so it is a
    # tenth of the 10 s deadline here: a miss then means the worker ignored the deadline.
    env.update(
        endpoint_env(llama.base_url, echo_pack, key_file, endpoint_deadline_margin_ms="1000")
    )
    settings = load_settings(None, env=env)
    worker = CloudWorker(settings)
    worker.start()
    assert worker.ready.wait(10)
    lines: list[dict[str, Any]] = []
    verdicts: list[Verdict] = []
    lock = threading.Lock()

    def emit(data: bytes) -> None:
        with lock:
            lines.extend(json.loads(x) for x in data.splitlines())

    agent = Agent(settings, Scorer.open(resolve()), emit=emit)
    agent.reconciler.listeners.append(verdicts.append)
    source = ReplaySource(
        str(TEST_JSONL),
        settings.input.max_line_bytes,
        rate_hz=0,
        loops=1,
        noise=2.0,
        seed=7,
        batch=16,
    )
    try:
        assert agent.run(source, exit_when_drained=True, drain_timeout_s=120) == 0
        assert wait_until(lambda: agent.reconciler.waiting() == 0, 60)
    finally:
        worker.stop()
    hard = [d for d in lines if d.get("route") == "hard"]
    assert hard, "noise at 2x std should produce hard cases"
    urgent_keys = {d["key"] for d in hard if d["tier"] == "urgent"}
    batch_keys = {d["key"] for d in hard if d["tier"] == "batch"}
    # Every hard case got exactly one answer back: a label from the endpoint, or "no verdict".
    assert sorted(v.key for v in verdicts) == sorted(urgent_keys | batch_keys)
    labelled = [v for v in verdicts if v.no_verdict is None]
    assert labelled, f"no labelled verdict: {[v.no_verdict for v in verdicts]}"
    for v in labelled:
        assert v.label in {"badminton", "running", "standing", "walking"}
        assert v.model == f"{MODEL_ALIAS}@endpoint"
    c = agent.reconciler.counters
    assert c["verdicts_on_time"] + c["no_verdict_urgent"] == len(urgent_keys)
    assert c["deadline_missed"] == 0
    # Tokens and cost, measured from the server's usage, in the ledger and its file.
    summary = summary_of(tmp_path / "ledger.db")
    assert summary == worker.ledger.summary()
    total = summary["total"]
    assert total["calls"] >= len(labelled)
    assert total["prompt_tokens"] > 0
    assert total["completion_tokens"] > 0
    assert total["urgent"] + total["batch"] == len(labelled)
    pricing = summary["pricing"]
    assert pricing["tokens_measured"] is True
    expected = total["prompt_tokens"] / 1000 * 0.5 + total["completion_tokens"] / 1000 * 1.5
    # Batch requests cost batch_price_factor (0.5) of the urgent price.
    assert 0.5 * expected - 1e-9 <= total["spend"] <= expected + 1e-9
    mean = (
        pricing["mean_prompt_tokens"] / 1000 * 0.5 + pricing["mean_completion_tokens"] / 1000 * 1.5
    )
    assert pricing["unit_price_urgent"] == pytest.approx(mean, rel=1e-3)
    assert total["all_cloud_sync"] == pytest.approx(total["readings_priced"] * mean, rel=1e-3)
    rtt = sorted(agent.reconciler.round_trips_ms)
    if rtt:
        print(
            f"\nendpoint in the loop: {len(rtt)} urgent round trips, p50"
            f" {rtt[len(rtt) // 2]:.1f} ms, p99 {rtt[min(len(rtt) - 1, int(0.99 * len(rtt)))]:.1f}"
            f" ms; mean tokens per request {pricing['mean_prompt_tokens']:.1f} prompt +"
            f" {pricing['mean_completion_tokens']:.1f} completion"
        )


def test_the_shipped_prompt_is_parsed_strictly_and_billed(
    broker: Mosquitto, topic_prefix: str, devices: Devices, llama: LlamaServer, key_file: Path
) -> None:
    """The real pack's prompt on SmolLM2: whatever it says is a label or a counted failure."""
    settings = worker_settings(broker, topic_prefix, llama.base_url, SHIPPED, key_file)
    worker = CloudWorker(settings)
    with running(worker):
        got = []
        for i in range(4):  # one at a time: the server answers one request at a time
            devices.send_urgent(urgent(10 + i, window=i * 2, deadline_ms=10000))
            got.append(verdict_of(devices)[0])
    for v in got:
        assert (
            v.no_verdict is None and v.label in {"badminton", "running", "standing", "walking"}
        ) or (v.no_verdict == "unparseable" and v.label == "")
    c = worker.counters
    assert c["urgent_scored"] + c["no_verdict_unparseable"] == 4
    total = worker.ledger.summary()["total"]
    assert total["calls"] == 4  # an unparseable answer is billed too
    assert total["prompt_tokens"] > 4 * 100  # the summary of six channels is in the prompt


# -- faults -----------------------------------------------------------------------------


def test_429_with_retry_after_is_waited_out_within_the_deadline(
    broker: Mosquitto,
    topic_prefix: str,
    devices: Devices,
    proxy: FaultProxy,
    echo_pack: Path,
    key_file: Path,
) -> None:
    settings = worker_settings(broker, topic_prefix, proxy.base_url, echo_pack, key_file)
    worker = CloudWorker(settings)
    with running(worker):
        proxy.set("429", times=1, retry_after="1")
        t0 = time.monotonic()
        devices.send_urgent(urgent(1, deadline_ms=5000))
        v, _ = verdict_of(devices)
        waited = time.monotonic() - t0
        assert (v.no_verdict, v.label) == (None, "walking")
        assert waited >= 1.0  # Retry-After honoured
        # A Retry-After past the deadline is not waited for: "no verdict" at once.
        proxy.set("429", times=1, retry_after="30")
        t0 = time.monotonic()
        devices.send_urgent(urgent(2, deadline_ms=3000))
        v, _ = verdict_of(devices)
        assert (v.no_verdict, v.label) == ("rate_limited", "")
        assert time.monotonic() - t0 < 2.0
    assert proxy.requests == 3
    c = worker.counters
    assert (c["urgent_scored"], c["no_verdict_rate_limited"], c["endpoint_retries"]) == (1, 1, 1)


def test_500_is_retried_a_bounded_number_of_times_then_no_verdict(
    broker: Mosquitto,
    topic_prefix: str,
    devices: Devices,
    proxy: FaultProxy,
    echo_pack: Path,
    key_file: Path,
) -> None:
    settings = worker_settings(
        broker, topic_prefix, proxy.base_url, echo_pack, key_file, endpoint_max_attempts="3"
    )
    worker = CloudWorker(settings)
    with running(worker):
        proxy.set("500", times=1)  # one 500, then the retry succeeds
        devices.send_urgent(urgent(1))
        assert verdict_of(devices)[0].label == "walking"
        proxy.set("500")  # always 500
        devices.send_urgent(urgent(2))
        v, _ = verdict_of(devices)
        assert v.no_verdict == "server_error"
        devices.nothing_more()
    assert proxy.requests == 2 + 3
    assert worker.counters["endpoint_failed_server_error"] == 1
    assert worker.counters["no_verdict"] == 1


def test_a_stalled_endpoint_is_answered_no_verdict_at_the_deadline_and_nothing_stalls(
    broker: Mosquitto,
    topic_prefix: str,
    devices: Devices,
    proxy: FaultProxy,
    echo_pack: Path,
    key_file: Path,
) -> None:
    settings = worker_settings(
        broker, topic_prefix, proxy.base_url, echo_pack, key_file, endpoint_concurrency="2"
    )
    worker = CloudWorker(settings)
    with running(worker):
        proxy.set("stall", times=3, stall_s=30.0)
        sent = {}
        for i in range(3):
            sent[f"dev-1:{i}"] = time.monotonic()
            devices.send_urgent(urgent(i, deadline_ms=1000))
        answers = [verdict_of(devices) for _ in range(3)]
        for v, _ in answers:
            assert v.no_verdict == "deadline"
            # Each answer comes at its deadline (less the margin), not when the stall ends.
            assert time.monotonic() - sent[v.key] < 2.5
        # The third waited for a free request slot (concurrency 2) and still got its answer.
        proxy.set("pass")
        devices.send_urgent(urgent(9))
        assert verdict_of(devices)[0].label == "walking"
    assert worker.counters["no_verdict_deadline"] == 3


def test_garbage_answers_are_counted_failures_never_guessed_labels(
    broker: Mosquitto,
    topic_prefix: str,
    devices: Devices,
    proxy: FaultProxy,
    echo_pack: Path,
    key_file: Path,
) -> None:
    settings = worker_settings(broker, topic_prefix, proxy.base_url, echo_pack, key_file)
    worker = CloudWorker(settings)
    with running(worker):
        proxy.set("garbage", times=1)  # a real completion whose text names two labels
        devices.send_urgent(urgent(1))
        v, _ = verdict_of(devices)
        assert (v.no_verdict, v.label) == ("unparseable", "")
        proxy.set("not_json", times=1)
        devices.send_urgent(urgent(2))
        assert verdict_of(devices)[0].no_verdict == "bad_response"
        devices.send_urgent(urgent(3))
        assert verdict_of(devices)[0].label == "walking"
    c = worker.counters
    assert (c["no_verdict_unparseable"], c["no_verdict_bad_response"], c["urgent_scored"]) == (
        1,
        1,
        1,
    )
    total = worker.ledger.summary()["total"]
    assert total["calls"] == 2  # the garbage answer's tokens were billed; the HTML had no usage
    assert total["urgent"] == 1


def test_a_wrong_api_key_is_a_401_not_retried(
    broker: Mosquitto,
    topic_prefix: str,
    devices: Devices,
    proxy: FaultProxy,
    echo_pack: Path,
    tmp_path: Path,
) -> None:
    wrong = tmp_path / "wrong-key"
    wrong.write_text("not-the-key")
    settings = worker_settings(broker, topic_prefix, proxy.base_url, echo_pack, wrong)
    worker = CloudWorker(settings)
    with running(worker):
        devices.send_urgent(urgent(1))
        assert verdict_of(devices)[0].no_verdict == "http_401"
    assert proxy.requests == 1
    assert worker.counters["endpoint_failed_http_401"] == 1


def test_endpoint_down_urgent_gets_no_verdict_batch_is_retried_until_it_is_back(
    broker: Mosquitto,
    topic_prefix: str,
    devices: Devices,
    proxy: FaultProxy,
    echo_pack: Path,
    key_file: Path,
) -> None:
    settings = worker_settings(
        broker,
        topic_prefix,
        proxy.base_url,
        echo_pack,
        key_file,
        endpoint_batch_retry_s="0.5",
        endpoint_batch_max_tries="20",
    )
    worker = CloudWorker(settings)
    with running(worker):
        proxy.stop()  # connection refused
        devices.send_urgent(urgent(1, deadline_ms=1500))
        assert verdict_of(devices)[0].no_verdict == "unreachable"
        cases = [urgent(10 + i, label=lbl) for i, lbl in enumerate(["running", "walking"])]
        cases = [msgspec.structs.replace(c, tier="batch", deadline_ms=None) for c in cases]
        devices.send_batch("dev-1", cases)
        assert wait_until(lambda: worker.counters["batch_retries_scheduled"] >= 2)
        devices.nothing_more(0.5)  # held for a retry, not answered, not lost
        devices.send_batch("dev-1", cases)  # the device sends them again meanwhile
        assert wait_until(lambda: worker.counters["duplicates_in_flight"] >= 2)
        proxy.start()  # back on the same port
        answered: list[Verdict] = []
        while len(answered) < 2:  # each case is retried on its own (jittered) schedule
            answered += msgspec.json.decode(
                devices.receive(20).payload, type=BatchVerdicts
            ).verdicts
        assert sorted((v.key, v.label) for v in answered) == [
            ("dev-1:10", "running"),
            ("dev-1:11", "walking"),
        ]
    assert worker.counters["batch_cases_scored"] == 2
    assert worker.ledger.summary()["total"]["batch"] == 2


def test_held_batch_cases_are_left_to_the_device_at_stop(
    broker: Mosquitto,
    topic_prefix: str,
    devices: Devices,
    proxy: FaultProxy,
    echo_pack: Path,
    key_file: Path,
) -> None:
    """A worker that stops while batch cases wait for a retry does not answer them "no
    verdict": the device keeps them until a verdict comes and sends them again."""
    settings = worker_settings(
        broker, topic_prefix, proxy.base_url, echo_pack, key_file, endpoint_batch_retry_s="30"
    )
    worker = CloudWorker(settings)
    with running(worker):
        proxy.stop()
        cases = [urgent(20 + i, label="running") for i in range(3)]
        cases = [msgspec.structs.replace(c, tier="batch", deadline_ms=None) for c in cases]
        devices.send_batch("dev-1", cases)
        assert wait_until(lambda: worker.counters["batch_retries_scheduled"] >= 3)
    assert devices.nothing_more(0.5)
    assert worker.counters["batch_left_for_resend"] == 3
    assert worker.counters["no_verdict"] == 0


def test_the_server_killed_and_restarted(
    broker: Mosquitto,
    topic_prefix: str,
    devices: Devices,
    tmp_path: Path,
    echo_pack: Path,
    key_file: Path,
) -> None:
    server = LlamaServer(tmp_path).start()
    settings = worker_settings(
        broker,
        topic_prefix,
        server.base_url,
        echo_pack,
        key_file,
        endpoint_batch_retry_s="0.5",
        endpoint_batch_max_tries="60",
    )
    worker = CloudWorker(settings)
    restarted = LlamaServer(tmp_path, port=server.port)
    try:
        with running(worker):
            devices.send_urgent(urgent(1))
            assert verdict_of(devices)[0].label == "walking"
            server.kill()
            devices.send_urgent(urgent(2, deadline_ms=1000))
            assert verdict_of(devices)[0].no_verdict in {"unreachable", "deadline"}
            case = msgspec.structs.replace(urgent(3, label="running"), tier="batch")
            devices.send_batch("dev-1", [case])
            assert wait_until(lambda: worker.counters["batch_retries_scheduled"] >= 1)
            restarted.start()
            got = msgspec.json.decode(devices.receive(30).payload, type=BatchVerdicts)
            assert [(v.key, v.label) for v in got.verdicts] == [("dev-1:3", "running")]
    finally:
        server.stop()
        restarted.stop()
    assert worker.counters["urgent_scored"] == 1
