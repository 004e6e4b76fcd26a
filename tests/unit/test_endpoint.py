"""The endpoint tier's pure parts: prompt, strict parser, Retry-After, rate limit, token ledger."""

from __future__ import annotations

import datetime as dt

import msgspec
import numpy as np
import pytest

from edge_agent.cloud.endpoint import TokenBucket, parse_retry_after
from edge_agent.cloud.ledger import CostLedger
from edge_agent.cloud.prompt import Prompt
from edge_agent.config import RouterSettings, load_settings
from edge_agent.errors import ConfigError
from edge_agent.models.pack import PromptSpec, resolve
from edge_agent.routing.router import Reconciler
from edge_agent.wire.messages import LocalDecision, Verdict, encoder

LABELS = ["badminton", "running", "standing", "walking"]
LOCAL = LocalDecision("walking", 0.41, "low_confidence", "basicmotions-int8@1.1.0")


def prompt(user: str = "$labels_or? $local_label", system: str = "one of: $labels") -> Prompt:
    return Prompt(PromptSpec(user=user, system=system), LABELS, ["a", "b"])


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("walking", "walking"),
        ("  Walking.\n", "walking"),
        ("RUNNING", "running"),
        ("walking running", None),
        ("I think walking", None),
        ("walk", None),
        ("walking!", None),
        ("", None),
        ("walking..", None),
    ],
)
def test_the_parser_takes_exactly_one_label_and_guesses_nothing(
    text: str, label: str | None
) -> None:
    assert prompt().parse(text) == label


def test_rendering_the_shipped_prompt() -> None:
    pack = resolve("basicmotions-cloud-endpoint")
    p = Prompt.from_pack(pack)
    values = np.zeros((6, 100), dtype=np.float32)
    values[0] = np.linspace(-1, 1, 100)
    fields = p.fields(values, LOCAL)
    assert fields["local_label"] == "walking"
    assert fields["local_confidence"] == "0.41"
    assert fields["labels_or"] == "badminton, running, standing or walking"
    assert fields["summary"].splitlines()[0] == "acc_x: mean 0.00, std 0.58, min -1.00, max 1.00"
    chat = p.body("chat", "m", fields)
    assert chat["model"] == "m"
    assert chat["temperature"] == 0.0
    assert chat["max_tokens"] == 4
    assert [m["role"] for m in chat["messages"]] == ["system", "user"]
    assert "acc_x: mean 0.00" in chat["messages"][1]["content"]
    assert "$" not in chat["messages"][0]["content"] + chat["messages"][1]["content"]
    plain = p.body("completions", "m", fields)
    assert "messages" not in plain
    assert plain["prompt"].startswith(chat["messages"][0]["content"])


def test_unknown_placeholders_and_packs_without_a_prompt_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown placeholder"):
        prompt(user="$label")
    with pytest.raises(ConfigError, match=r"'\$' that starts no placeholder"):
        prompt(user="costs $5")
    with pytest.raises(ConfigError, match="no \\[prompt\\] table"):
        Prompt.from_pack(resolve("basicmotions-cloud"))


def test_retry_after_seconds_and_http_dates() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after(" 0.5 ", now) == 0.5
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:07 GMT", now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # in the past
    for bad in (None, "", "soon", "-3", "nan", "inf"):
        assert parse_retry_after(bad, now) is None


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_token_bucket_bursts_then_paces_and_respects_the_deadline() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        assert bucket.acquire(deadline=clock.t)  # the burst, without waiting
    start = clock.t
    assert bucket.acquire(deadline=clock.t + 1.0)
    assert clock.t - start == pytest.approx(0.5)  # 2 per second
    assert not bucket.acquire(deadline=clock.t + 0.1)  # the next token is 0.5 s away
    assert TokenBucket(0.0, 1).acquire(deadline=0.0)  # rate 0: no limit


def test_ledger_bills_measured_tokens_and_prices_the_counterfactual_with_them() -> None:
    led = CostLedger(
        0.04,
        0.5,
        1500,
        price_prompt_per_1k=1.0,
        price_completion_per_1k=3.0,
        batch_price_factor=0.5,
    )
    assert led.unit_price("urgent") == pytest.approx(0.06)  # the estimate, before any request
    assert led.charge_tokens("d1", "urgent", 100, 2, answered=True) == pytest.approx(0.106)
    assert led.charge_tokens("d1", "batch", 300, 6, answered=True) == pytest.approx(0.159)
    assert led.charge_tokens("d1", "urgent", 200, 4, answered=False) == pytest.approx(0.212)
    led.observe("d1", 10)
    s = led.summary()
    assert s["pricing"]["tokens_measured"] is True
    assert (s["pricing"]["mean_prompt_tokens"], s["pricing"]["mean_completion_tokens"]) == (200, 4)
    d = s["devices"]["d1"]
    assert (d["urgent"], d["batch"], d["calls"]) == (1, 1, 3)  # the unparseable one is billed
    assert (d["prompt_tokens"], d["completion_tokens"], d["tokens"]) == (600, 12, 612)
    assert d["spend"] == pytest.approx(0.106 + 0.159 + 0.212)
    assert d["all_cloud_sync"] == pytest.approx(10 * 0.212)
    assert d["all_cloud_batch"] == pytest.approx(10 * 0.106)
    restored = CostLedger(0.04, 0.5, 1500)
    restored.restore(msgspec.json.encode(s))
    assert restored.totals()["d1"].prompt_tokens == 600
    assert restored.totals()["d1"].calls == 3


def test_endpoint_settings_defaults_and_env() -> None:
    s = load_settings(None, env={"EDGE_AGENT_ENDPOINT_RATE_PER_S": "2.5"})
    assert s.cloud.backend == "pack"
    assert s.endpoint.rate_per_s == 2.5
    assert s.endpoint.batch_price_factor == 0.5
    with pytest.raises(ConfigError, match="ENDPOINT_API_KEY"):
        load_settings(None, env={"EDGE_AGENT_ENDPOINT_API_KEY": "sk-..."})


def test_a_no_verdict_settles_the_case_without_a_label() -> None:
    rec = Reconciler(RouterSettings())
    rec.expect("d:1", "walking", "urgent")
    rec.expect("d:2", "walking", "urgent")
    ok = Verdict(1, "d:1", "d", 1, "walking", 1.0, "m", "urgent")
    none = Verdict(1, "d:2", "d", 2, "", 0.0, "m", "urgent", no_verdict="deadline")
    assert b"no_verdict" not in encoder.encode(ok)  # old devices still read ordinary verdicts
    seen: list[Verdict] = []
    rec.listeners.append(seen.append)
    rec.on_verdict(encoder.encode(ok))
    rec.on_verdict(encoder.encode(none))
    assert [v.key for v in seen] == ["d:1", "d:2"]
    c = rec.counters
    assert (c["verdicts_on_time"], c["no_verdict"], c["agree"], c["disagree"]) == (1, 1, 1, 0)
    assert rec.waiting() == 0
