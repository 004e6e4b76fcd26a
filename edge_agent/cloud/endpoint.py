"""The cloud tier's model behind an OpenAI-compatible HTTP endpoint (``cloud.backend``).

Any server speaking OpenAI's ``/v1/chat/completions`` (or ``/v1/completions``)
protocol will do: OpenAI itself, vLLM, llama.cpp's server, TGI, Ollama. This
module is the client side, in four parts, each usable alone:

* ``Prompt`` (``prompt.py``) turns a hard case into a request body from the cloud
  pack's ``[prompt]`` table and parses the reply strictly into one of its labels.
* ``parse_retry_after`` reads a ``Retry-After`` header (seconds or HTTP date).
* ``TokenBucket`` is the client-side rate limit shared by all requests.
* ``EndpointClient`` sends one request with a deadline: one httpx client with
  connection reuse, a per-attempt timeout that never reaches past the
  deadline, bounded retries with full-jitter exponential backoff on 429, 5xx
  and connection failures — waiting at least the server's ``Retry-After``, and
  giving up at once when that wait would pass the deadline. Every outcome is
  a ``Reply``: a label, or a failure reason, plus the tokens the server billed
  (its ``usage``), which an unparseable answer costs as well.

httpx is an optional dependency (extra ``cloud-http``), imported only when a
client is created, so a device without it never imports it and a cloud
worker configured for the endpoint without it gets ``BackendUnavailable``
with the install command.

Failure reasons (``FAILURES``): ``unreachable`` (connection refused, reset,
server gone), ``rate_limited`` (429 after the last attempt, or a Retry-After
too long to wait), ``server_error`` (5xx after the last attempt),
``http_<code>`` (a 4xx other than 429: 401 bad key, 404 unknown model, ... —
not retried), ``bad_response`` (not the protocol's JSON), ``unparseable`` (the
answer is not exactly one label), ``deadline`` (time ran out: waiting for a
request slot, the rate limit, a retry, or the server), ``overloaded`` (too many
cases already waiting), ``stopped`` (the worker is stopping).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from edge_agent.cloud.prompt import Prompt
from edge_agent.config import EndpointSettings, read_secret
from edge_agent.errors import BackendUnavailable, ConfigError, EndpointError
from edge_agent.util.backoff import full_jitter
from edge_agent.wire.messages import LocalDecision, Tier

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

FAILURES = (
    "unreachable",
    "rate_limited",
    "server_error",
    "http_4xx",
    "bad_response",
    "unparseable",
    "deadline",
    "overloaded",
    "stopped",
)
#: Failures worth another try later (batch tier): the endpoint, not the case, was at fault.
TRANSIENT = frozenset({"unreachable", "rate_limited", "server_error", "deadline", "overloaded"})
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
INSTALL_HINT = "pip install 'edge-agent[cloud-http]'"


# ----------------------------------------------------------------------------- retry-after


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    None when absent or unreadable; a date in the past gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    current = now if now is not None else dt.datetime.now(dt.UTC)
    return max(0.0, (when - current).total_seconds())


# ----------------------------------------------------------------------------- rate limit


class TokenBucket:
    """A thread-safe token bucket: ``rate`` requests per second, bursts of ``burst``.

    ``rate`` 0 means no limit. ``acquire`` waits for a token, but never past a deadline.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.sleep = sleep
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def _reserve(self) -> float:
        """Take a token now if there is one (0.0), else the wait until the next one."""
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def acquire(self, deadline: float) -> bool:
        """Take one token, waiting as needed; False when it would come after ``deadline``."""
        if self.rate == 0:
            return True
        while True:
            wait = self._reserve()
            if wait == 0.0:
                return True
            if self.clock() + wait > deadline:
                return False
            self.sleep(wait)


# ----------------------------------------------------------------------------- client


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None  #: chat/completions
    text: str | None = None  #: completions
    finish_reason: str | None = None


class _Response(msgspec.Struct):
    """The part of an OpenAI (chat) completion response we read; other fields are ignored."""

    choices: list[_Choice]
    usage: _Usage | None = None


_response_decoder = msgspec.json.Decoder(_Response)


@dataclass(slots=True)
class Reply:
    """The outcome of asking the endpoint about one case."""

    label: str | None = None  #: a label of the pack, or None on failure
    failure: str | None = None  #: a reason of ``FAILURES`` (``http_4xx`` as ``http_<code>``)
    detail: str = ""
    prompt_tokens: int = 0  #: billed by the server (its ``usage``), summed over attempts
    completion_tokens: int = 0
    usage_reported: bool = False  #: the server sent a ``usage`` object
    attempts: int = 0
    elapsed_ms: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EndpointClient:
    """One OpenAI-compatible endpoint: ``ask`` sends a request body and returns a ``Reply``.

    Thread-safe (one httpx client, its connection pool sized for the worker's
    concurrency). ``stop_event`` set makes waits between retries end early.
    """

    def __init__(
        self,
        settings: EndpointSettings,
        prompt: Prompt,
        *,
        max_connections: int | None = None,
        stop_event: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not settings.base_url:
            raise ConfigError("endpoint.base_url is not set (cloud.backend = 'endpoint')")
        if not settings.model:
            raise ConfigError("endpoint.model is not set (cloud.backend = 'endpoint')")
        try:
            import httpx  # noqa: PLC0415 - optional, only cloud workers using an endpoint need it
        except ImportError as exc:
            raise BackendUnavailable(
                f"the endpoint tier needs httpx, which is not installed: {INSTALL_HINT}"
            ) from exc
        self._httpx = httpx
        self.settings = settings
        self.prompt = prompt
        self.clock = clock
        self.stop_event = stop_event or threading.Event()
        self.bucket = TokenBucket(settings.rate_per_s, settings.burst, clock, self._sleep)
        headers = {"Accept": "application/json"}
        if settings.api_key_file:
            # Read once at start; never logged (httpx does not log headers either).
            headers["Authorization"] = f"Bearer {read_secret(settings.api_key_file)}"
        pool = max_connections or settings.concurrency + settings.batch_concurrency
        self.path = "chat/completions" if settings.api == "chat" else "completions"
        self._client = httpx.Client(
            base_url=settings.base_url.rstrip("/") + "/",
            headers=headers,
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            follow_redirects=False,
            trust_env=False,
        )

    def close(self) -> None:
        self._client.close()

    def _sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)

    def _backoff(self, attempt: int) -> float:
        return full_jitter(self.settings.backoff_min_s, self.settings.backoff_max_s, attempt - 1)

    def ask(self, body: Mapping[str, Any], deadline: float) -> Reply:  # noqa: PLR0911 - one per outcome
        """Send ``body``; retry within the deadline (``time.monotonic`` seconds); never raises."""
        t0 = self.clock()
        reply = Reply()
        while True:
            if self.stop_event.is_set():
                return self._fail(reply, "stopped", "the worker is stopping", t0)
            if self.clock() >= deadline:
                return self._fail(reply, "deadline", "no time left for a request", t0)
            if not self.bucket.acquire(deadline):
                return self._fail(reply, "deadline", "the client-side rate limit", t0)
            reply.attempts += 1
            try:
                text = self._attempt(body, deadline, reply)
            except EndpointError as exc:
                retryable = exc.reason in {"unreachable", "rate_limited", "server_error"}
                if not retryable or reply.attempts >= self.settings.max_attempts:
                    return self._fail(reply, exc.reason, exc.message, t0)
                delay = self._backoff(reply.attempts)
                if exc.retry_after is not None:
                    if exc.retry_after > self.settings.retry_after_max_s:
                        return self._fail(
                            reply,
                            exc.reason,
                            f"Retry-After {exc.retry_after:.1f} s is too long",
                            t0,
                        )
                    delay = max(delay, exc.retry_after)
                if self.clock() + delay >= deadline:
                    return self._fail(
                        reply,
                        exc.reason,
                        f"{exc.message}; a retry in {delay:.2f} s is too late",
                        t0,
                    )
                log.debug("endpoint: %s; retry %d in %.3f s", exc.message, reply.attempts, delay)
                self._sleep(delay)
                continue
            label = self.prompt.parse(text)
            reply.elapsed_ms = (self.clock() - t0) * 1000.0
            if label is None:
                reply.failure = "unparseable"
                reply.detail = f"answer {text[:80]!r} is not one of the labels"
                return reply
            reply.label = label
            return reply

    def _fail(self, reply: Reply, reason: str, detail: str, t0: float) -> Reply:
        reply.failure = reason
        reply.detail = detail
        reply.elapsed_ms = (self.clock() - t0) * 1000.0
        return reply

    def _attempt(self, body: Mapping[str, Any], deadline: float, reply: Reply) -> str:
        """One POST; the answer's text, or EndpointError (translated from httpx here)."""
        httpx = self._httpx
        remaining = deadline - self.clock()
        if remaining <= 0:
            raise EndpointError("deadline", "no time left for a request")
        timeout = httpx.Timeout(remaining, connect=min(self.settings.connect_timeout_s, remaining))
        try:
            response = self._client.post(self.path, json=dict(body), timeout=timeout)
        except httpx.TimeoutException as exc:
            if self.clock() >= deadline - 1e-3:
                raise EndpointError(
                    "deadline", f"no answer in time ({type(exc).__name__})"
                ) from exc
            raise EndpointError("unreachable", f"timed out: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise EndpointError("unreachable", f"{type(exc).__name__}: {exc}") from exc
        return self._read(response, reply)

    def _read(self, response: httpx.Response, reply: Reply) -> str:
        status = response.status_code
        if status != 200:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status == 429:
                raise EndpointError("rate_limited", "HTTP 429", retry_after)
            if status in RETRY_STATUSES or status >= 500:
                raise EndpointError("server_error", f"HTTP {status}", retry_after)
            raise EndpointError(f"http_{status}", f"HTTP {status}: {response.text[:200]!r}")
        try:
            parsed = _response_decoder.decode(response.content)
        except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError) as exc:
            raise EndpointError("bad_response", f"not a completion: {exc}") from None
        if parsed.usage is not None:
            reply.usage_reported = True
            reply.prompt_tokens += max(0, parsed.usage.prompt_tokens)
            reply.completion_tokens += max(0, parsed.usage.completion_tokens)
        if len(parsed.choices) != 1:
            raise EndpointError("bad_response", f"{len(parsed.choices)} choices instead of 1")
        choice = parsed.choices[0]
        text = choice.message.content if choice.message is not None else choice.text
        if text is None:
            raise EndpointError("bad_response", "the choice has no text")
        return text


# ----------------------------------------------------------------------------- worker side


@dataclass(slots=True)
class Job:
    """One case to ask the endpoint about; ``reply`` is set when it is done."""

    body: dict[str, Any]
    deadline: float  #: ``time.monotonic()`` seconds
    tier: Tier
    token: Any = None  #: the caller's own context, handed back untouched
    reply: Reply | None = None


class EndpointTier:
    """Runs endpoint requests off the caller's thread, within the concurrency limits.

    Urgent jobs go to a pool of ``endpoint.concurrency`` threads, at most
    ``endpoint.max_queue`` of them waiting for a thread (``submit_urgent`` returns
    False past that: the caller answers "no verdict", ``overloaded``). Batch groups go to
    ``endpoint.batch_concurrency`` threads; ``done`` is called once per group when every
    job of it has its reply. All requests share one client, so one connection pool and
    one rate limit. ``done`` callbacks run on the request threads: they must only hand
    the result over (e.g. put it on a queue).
    """

    def __init__(self, settings: EndpointSettings, prompt: Prompt) -> None:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - only this tier

        self.settings = settings
        self.prompt = prompt
        self.stop_event = threading.Event()
        self.client = EndpointClient(settings, prompt, stop_event=self.stop_event)
        self._urgent = ThreadPoolExecutor(settings.concurrency, "edge-endpoint-urgent")
        self._batch = ThreadPoolExecutor(settings.batch_concurrency, "edge-endpoint-batch")
        self._lock = threading.Lock()
        self._urgent_open = 0  #: urgent jobs queued or running
        self._open = 0  #: all jobs queued or running

    def body(self, values: np.ndarray[Any, Any], local: LocalDecision) -> dict[str, Any]:
        return self.prompt.body(
            self.settings.api, self.settings.model, self.prompt.fields(values, local)
        )

    @property
    def busy(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._open

    def submit_urgent(self, job: Job, done: Callable[[Job], None]) -> bool:
        with self._lock:
            if self._urgent_open >= self.settings.max_queue + self.settings.concurrency:
                return False
            self._urgent_open += 1
            self._open += 1
        self._urgent.submit(self._run_urgent, job, done)
        return True

    def _run_urgent(self, job: Job, done: Callable[[Job], None]) -> None:
        try:
            job.reply = self._ask(job)
        finally:
            with self._lock:
                self._urgent_open -= 1
                self._open -= 1
            done(job)

    def submit_group(self, jobs: list[Job], done: Callable[[list[Job]], None]) -> None:
        """Send a closed batch's jobs together; ``done(jobs)`` when all have replies."""
        if not jobs:
            done(jobs)
            return
        remaining = [len(jobs)]
        with self._lock:
            self._open += len(jobs)

        def run(job: Job) -> None:
            try:
                job.reply = self._ask(job)
            finally:
                with self._lock:
                    self._open -= 1
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    done(jobs)

        for job in jobs:
            self._batch.submit(run, job)

    def _ask(self, job: Job) -> Reply:
        try:
            return self.client.ask(job.body, job.deadline)
        except Exception as exc:  # last line of defence: a job always gets a reply
            log.exception("endpoint request failed unexpectedly")
            return Reply(failure="bad_response", detail=f"internal error: {exc!r}")

    def close(self, timeout: float) -> int:
        """Stop: waits end at once, queued jobs fail ``stopped``; returns jobs still open."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        left = self.busy
        self._urgent.shutdown(wait=False)
        self._batch.shutdown(wait=False)
        self.client.close()
        return left
