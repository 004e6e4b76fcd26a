"""How the cloud worker's answers go out: one ``Verdict`` to an urgent case's reply topic
(correlation data copied back), one ``BatchVerdicts`` per batch on the device's verdict topic,
each with the idempotency key and the answering worker as MQTT v5 user properties. Verdicts
published and not yet acknowledged by the broker are tracked, so that a lost connection and
the stop can say how many were lost."""

from __future__ import annotations

import logging
import time
from collections import Counter

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.cloud.intake import Answer, BatchCtx, Rejected, UrgentCtx
from edge_agent.cloud.metrics import verdict_histograms
from edge_agent.wire.messages import (
    IDEMPOTENCY_PROPERTY,
    SCHEMA_VERSION,
    BatchVerdicts,
    Tier,
    Topics,
    encoder,
)

log = logging.getLogger(__name__)

#: MQTT v5 user property on every verdict naming the worker that answered (for tracing).
WORKER_PROPERTY = "cloud-worker"


def ms_since(t0_ns: int) -> float:
    return round((time.monotonic_ns() - t0_ns) / 1e6, 3)


class Verdicts:
    """Publishes verdicts on the worker's network thread and tracks their PUBACKs."""

    def __init__(self, topics: Topics, worker_id: str, counters: Counter[str]) -> None:
        self.topics = topics
        self.worker_id = worker_id
        self.counters = counters
        self.unacked: set[int] = set()
        #: Receipt to verdict, seconds, per tier (``metrics.py``); observed on this thread.
        self.latency = verdict_histograms()

    def urgent(self, client: mqtt.Client, ctx: UrgentCtx, answer: Answer) -> None:
        """An urgent case's verdict to its reply topic, correlation data copied back."""
        cloud_ms = ms_since(ctx.received_ns)
        self.latency[Tier.URGENT].observe(cloud_ms / 1000.0)
        verdict = answer.verdict(ctx.case, Tier.URGENT, cloud_ms)
        props = self._properties(ctx.case.key)
        if ctx.correlation is not None:
            props.CorrelationData = ctx.correlation
        self._publish(client, ctx.reply_to, encoder.encode(verdict), props, 1)

    def batch(self, client: mqtt.Client | None, ctx: BatchCtx) -> None:
        """The verdicts of a batch (echoes of repeated cases filled in) in one message."""
        answers = ctx.answers
        for i, first in ctx.echoes:
            answers[i] = (answers[i][0], answers[first][1])
        cloud_ms = ms_since(ctx.received_ns)
        verdicts = [a.verdict(case, Tier.BATCH, cloud_ms) for case, a in answers if a is not None]
        if not verdicts:
            return
        self.latency[Tier.BATCH].observe(cloud_ms / 1000.0)
        if client is None:
            self.counters["verdicts_unsent"] += len(verdicts)
            return
        body = encoder.encode(BatchVerdicts(v=SCHEMA_VERSION, device=ctx.device, verdicts=verdicts))
        props = self._properties(f"{verdicts[0].key}+{len(verdicts)}")
        self._publish(client, self.topics.verdict(ctx.device), body, props, len(verdicts))

    def acknowledged(self, mid: int, refused: str) -> None:
        """The broker's PUBACK for a verdict (``refused``: its failure reason code, if any)."""
        self.unacked.discard(mid)
        if refused:
            self.counters["verdicts_refused"] += 1
            log.error("the broker refused a verdict: %s", refused)

    def lost(self) -> None:
        """The connection is lost: verdicts not acknowledged are lost (the devices fall back
        on their local answers when their deadline passes)."""
        if self.unacked:
            self.counters["verdicts_lost"] += len(self.unacked)
            self.unacked.clear()

    def drain(self, client: mqtt.Client, timeout_s: float) -> None:
        """At stop: serve the client's I/O until the broker acknowledged every verdict."""
        deadline = time.monotonic() + timeout_s
        while self.unacked and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        if self.unacked:
            log.warning("%d verdict(s) not acknowledged at stop", len(self.unacked))

    def _properties(self, key: str) -> Properties:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [(IDEMPOTENCY_PROPERTY, key), (WORKER_PROPERTY, self.worker_id)]
        return props

    def _publish(
        self, client: mqtt.Client, topic: str, body: bytes, props: Properties, verdicts: int
    ) -> None:
        try:
            info = client.publish(topic, body, qos=1, properties=props)
        except ValueError as exc:  # a topic paho refuses; validated before, so unexpected
            raise Rejected("response_topic", str(exc)) from None
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.counters["verdicts_unsent"] += verdicts
            log.error("verdict to %s not sent: %s", topic, mqtt.error_string(info.rc))
            return
        self.unacked.add(info.mid)
        self.counters["verdicts_sent"] += verdicts
