"""The endpoint mode of the cloud worker (``cloud.backend = "endpoint"``): hard cases are
answered by an OpenAI-compatible endpoint (``endpoint.py``) instead of a local model pack.

Requests run on the endpoint's own threads; their answers come back to the worker's network
thread (``service``), the only code that touches the MQTT client. An urgent case is answered
within its deadline or with a "no verdict"; a batch case whose request failed transiently is
tried again after ``endpoint.batch_retry_s`` (up to ``endpoint.batch_max_tries``). At stop,
cases not answered are left to the devices, which send them again (``link.confirm``).
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import paho.mqtt.client as mqtt

from edge_agent.cloud.books import Billed, Books
from edge_agent.cloud.endpoint import TRANSIENT, EndpointTier, Job, Reply
from edge_agent.cloud.intake import Answer, BatchCtx, Pending, Throttle, UrgentCtx
from edge_agent.cloud.verdicts import Verdicts
from edge_agent.config import EndpointSettings
from edge_agent.errors import LedgerError
from edge_agent.ingest.readings import Reading
from edge_agent.wire.messages import HardCase, Tier

log = logging.getLogger(__name__)

#: At stop: longest wait for the endpoint's open requests.
DRAIN_TIMEOUT_S = 2.0


@dataclass(slots=True)
class _Retry:
    """A batch case whose request failed, due for another try."""

    due: float
    device: str
    pending: Pending


class Host(Protocol):
    """What the endpoint mode uses of its worker (all on the worker's network thread)."""

    counters: Counter[str]
    books: Books
    throttle: Throttle
    verdicts: Verdicts

    def stop_requested(self) -> bool: ...
    def current_client(self) -> mqtt.Client | None: ...
    def ledger_failed(self, exc: LedgerError, cases: int) -> None: ...


def ack(client: mqtt.Client, mid: int, qos: int, current: mqtt.Client | None) -> None:
    """Acknowledge a request (manual acks), if it came on the connection still in use."""
    if qos > 0 and client is current:
        client.ack(mid, qos)


class EndpointTiers:
    """The urgent and batch tiers answered by an endpoint; see the module docstring."""

    def __init__(self, settings: EndpointSettings, tier: EndpointTier, host: Host) -> None:
        self.settings = settings
        self.tier = tier
        self.host = host
        self.model_name = f"{settings.model}@endpoint"
        #: Finished endpoint work, handed from the request threads to the network thread.
        self._done: queue.SimpleQueue[Job | tuple[BatchCtx, list[Job]]] = queue.SimpleQueue()
        self._retries: list[_Retry] = []
        #: (device, key) of cases at the endpoint or waiting for a retry: a copy the device
        #: sends meanwhile (it re-sends what is not answered) is not asked for twice.
        self._working: set[tuple[str, str]] = set()

    @property
    def busy(self) -> bool:
        return self.tier.busy > 0

    def working(self, device: str, key: str) -> bool:
        return (device, key) in self._working

    def submit_urgent(self, ctx: UrgentCtx, reading: Reading, deadline_ms: float) -> None:
        case = ctx.case
        job = Job(
            body=self.tier.body(reading.values, case.local),
            deadline=ctx.received_ns / 1e9 + deadline_ms / 1000.0,
            tier=Tier.URGENT,
            token=ctx,
        )
        self._working.add((case.device, case.key))
        if not self.tier.submit_urgent(job, self._done.put):
            job.reply = Reply(failure="overloaded", detail="too many urgent cases waiting")
            self._finish_urgent(job)

    def submit_group(self, ctx: BatchCtx, pending: list[Pending]) -> None:
        deadline = time.monotonic() + self.settings.batch_timeout_s
        jobs = []
        for p in pending:
            self._working.add((ctx.device, p.case.key))
            p.tries += 1
            body = self.tier.body(p.reading.values, p.case.local)
            jobs.append(Job(body=body, deadline=deadline, tier=Tier.BATCH, token=p))
        self.tier.submit_group(jobs, lambda done: self._done.put((ctx, done)))

    def service(self) -> None:
        """On the network thread: publish what the endpoint answered; send due retries."""
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                self._finish_urgent(item)
            else:
                self._finish_group(*item)
        if self._retries and not self.host.stop_requested():
            now = time.monotonic()
            due = [r for r in self._retries if r.due <= now]
            if due:
                self._retries = [r for r in self._retries if r.due > now]
                by_device: dict[str, list[Pending]] = {}
                for r in due:
                    by_device.setdefault(r.device, []).append(r.pending)
                for device, group in by_device.items():
                    answers: list[tuple[HardCase, Answer | None]] = []
                    for p in group:
                        p.index = len(answers)
                        answers.append((p.case, None))
                    ctx = BatchCtx(device, answers, [], None, 0, 0, time.monotonic_ns())
                    self.submit_group(ctx, group)

    def close(self) -> None:
        """Stop the endpoint tier: open requests end (``stopped``), their answers go out."""
        if self.tier.stop_event.is_set():
            return
        left = self.tier.close(DRAIN_TIMEOUT_S)
        if left:
            self.host.counters["endpoint_open_at_stop"] += left
            log.warning("%d endpoint request(s) still open at stop", left)
        self.service()
        if self._retries:
            # Left unanswered on purpose: the devices keep them and send them again
            # (link.confirm = "verdict") to whichever worker serves then.
            self.host.counters["batch_left_for_resend"] += len(self._retries)
            log.warning(
                "%d batch case(s) waiting for a retry left to the devices to send again",
                len(self._retries),
            )
            self._retries = []
            self._working.clear()

    def _account(self, device: str, tier: Tier, key: str, reply: Reply) -> Billed:
        """Count one finished request; what to record of it."""
        counters = self.host.counters
        counters["endpoint_requests"] += reply.attempts
        if reply.attempts > 1:
            counters["endpoint_retries"] += reply.attempts - 1
        answer = None if reply.label is None else Answer(reply.label, 1.0, self.model_name)
        billed = Billed(
            device,
            tier,
            reply.prompt_tokens,
            reply.completion_tokens,
            key,
            answer,
            reported=reply.usage_reported,
        )
        if not reply.usage_reported and (answer is not None or reply.failure == "unparseable"):
            counters["endpoint_usage_missing"] += 1
        if reply.failure is not None:
            counters[f"endpoint_failed_{reply.failure}"] += 1
            if self.host.throttle.allow(f"endpoint-{reply.failure}")[0]:
                log.warning("endpoint (%s): %s: %.300s", tier, reply.failure, reply.detail)
        return billed

    def _no_verdict(self, reason: str) -> Answer:
        self.host.counters["no_verdict"] += 1
        self.host.counters[f"no_verdict_{reason}"] += 1
        return Answer("", 0.0, self.model_name, reason)

    def _finish_urgent(self, job: Job) -> None:
        ctx: UrgentCtx = job.token
        reply = job.reply or Reply(failure="stopped", detail="no reply")
        case = ctx.case
        self._working.discard((case.device, case.key))
        billed = self._account(case.device, Tier.URGENT, case.key, reply)
        client = self.host.current_client()
        try:  # the bill is recorded before the verdict goes out
            self.host.books.billed([billed])
        except LedgerError as exc:
            self.host.ledger_failed(exc, 1)
            ack(ctx.client, ctx.mid, ctx.qos, client)
            return
        if reply.label is not None:
            answer = Answer(reply.label, 1.0, self.model_name)
            self.host.books.memory.put(case.device, case.key, answer)
            self.host.counters["urgent_scored"] += 1
        else:
            answer = self._no_verdict(reply.failure or "bad_response")
        if client is None:
            self.host.counters["verdicts_unsent"] += 1
        else:
            self.host.verdicts.urgent(client, ctx, answer)
        ack(ctx.client, ctx.mid, ctx.qos, client)

    def _finish_group(self, ctx: BatchCtx, jobs: list[Job]) -> None:
        replies = [
            (job.token, job.reply or Reply(failure="stopped", detail="no reply")) for job in jobs
        ]
        bills = [self._account(ctx.device, Tier.BATCH, p.case.key, r) for p, r in replies]
        try:  # the bills are recorded (one transaction) before the verdicts go out
            self.host.books.billed(bills)
        except LedgerError as exc:
            self.host.ledger_failed(exc, len(jobs))
            for p, _ in replies:
                self._working.discard((ctx.device, p.case.key))
            if ctx.client is not None:
                ack(ctx.client, ctx.mid, ctx.qos, self.host.current_client())
            return
        for p, reply in replies:
            if reply.label is not None:
                answer = Answer(reply.label, 1.0, self.model_name)
                self.host.books.memory.put(ctx.device, p.case.key, answer)
                self._working.discard((ctx.device, p.case.key))
                ctx.answers[p.index] = (p.case, answer)
                self.host.counters["batch_cases_scored"] += 1
                continue
            reason = self._failed(ctx.device, p, reply.failure or "bad_response")
            if reason:
                self._working.discard((ctx.device, p.case.key))
                ctx.answers[p.index] = (p.case, self._no_verdict(reason))
        self.host.verdicts.batch(self.host.current_client(), ctx)
        if ctx.client is not None:
            ack(ctx.client, ctx.mid, ctx.qos, self.host.current_client())

    def _failed(self, device: str, p: Pending, failure: str) -> str:
        """A batch case's request failed: "" when it is tried again later (or left to the
        device), else the no-verdict reason to answer with now."""
        s = self.settings
        if self.host.stop_requested() and (failure in TRANSIENT or failure == "stopped"):
            # Not answered: the device sends it again (link.confirm) to whoever serves then.
            self._working.discard((device, p.case.key))
            self.host.counters["batch_left_for_resend"] += 1
            return ""
        if (
            failure in TRANSIENT
            and p.tries < s.batch_max_tries
            and len(self._retries) < s.max_retry_cases
        ):
            delay = s.batch_retry_s * random.uniform(0.5, 1.5)  # noqa: S311
            self._retries.append(_Retry(time.monotonic() + delay, device, p))
            self.host.counters["batch_retries_scheduled"] += 1
            return ""
        if failure not in TRANSIENT:
            return failure  # the answer itself was wrong (unparseable, 401, ...): final
        return "gave_up" if p.tries >= s.batch_max_tries else "overloaded"
