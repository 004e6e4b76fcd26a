"""The cost ledger in Redis: one store for every worker of a fleet, on any host.

``cloud.ledger_path = "redis://host:port/db"`` (extra ``cloud-redis``: redis-py). The same
promise as the SQLite ledger (``ledger_store.py``) — a case is charged once, recorded before
its verdict goes out — kept across hosts: each charge runs as one Lua script, which Redis
executes atomically, so the idempotency record and the figures it adds to cannot part.

Keys, under ``edge-agent:ledger:``:

* ``ans:<device>:<key>`` — the answer to a case (JSON), written with ``SET NX EX
  cloud.answers_keep_s``: the first worker to record it charges it; a later copy is answered
  from it and charged nothing (an endpoint request still counts its tokens: it was billed).
* ``usage:<day>:<device>`` — a hash of the day's figures (``HINCRBY``/``HINCRBYFLOAT``),
  listed in the set ``usage-index``.
* ``devices`` — the highest ``readings_total`` per device; ``meta`` — the prices.

Durability is Redis's: with ``appendonly yes`` and ``appendfsync everysec`` every recorded
charge survives a crash of Redis itself (the write reached the operating system), and at most
the last second is lost to a power cut of the Redis host; ``appendfsync always`` closes that too.
One Redis (or a primary with replicas); Redis Cluster is not supported, the script touching
keys of several slots.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import redis

from edge_agent.cloud.intake import Answer
from edge_agent.cloud.ledger import LEDGER_KEEP_DAYS, CostLedger, Usage
from edge_agent.cloud.ledger_store import FIELDS, Charge, without_cases
from edge_agent.errors import LedgerError

PREFIX = "edge-agent:ledger:"

_RECORD = """
local p, ttl, day = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n, i, out = tonumber(ARGV[4]), 5, {}
local fields = {'urgent', 'batch', 'tokens', 'spend_urgent', 'spend_batch', 'calls',
                'prompt_tokens', 'completion_tokens'}
for c = 1, n do
  local device, key, answer, billed = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local fresh = 1
  if key ~= '' and answer ~= '' then
    if not redis.call('SET', p .. 'ans:' .. device .. ':' .. key, answer, 'NX', 'EX', ttl) then
      fresh = 0
    end
  end
  if fresh == 1 or billed == '1' then
    local h, added = p .. 'usage:' .. day .. ':' .. device, false
    for f = 1, 8 do
      local v = ARGV[i + 3 + f]
      if tonumber(v) ~= 0 and (fresh == 1 or f > 2) then
        if f == 4 or f == 5 then
          redis.call('HINCRBYFLOAT', h, fields[f], v)
        else
          redis.call('HINCRBY', h, fields[f], v)
        end
        added = true
      end
    end
    if added then
      redis.call('SADD', p .. 'usage-index', day .. '|' .. device)
    end
  end
  out[c] = fresh
  i = i + 12
end
local m = tonumber(ARGV[i])
i = i + 1
for r = 1, m do
  local d, t = ARGV[i], tonumber(ARGV[i + 1])
  local cur = tonumber(redis.call('HGET', p .. 'devices', d) or '-1')
  if t > cur then
    redis.call('HSET', p .. 'devices', d, t)
  end
  i = i + 2
end
return out
"""


#: What a Redis call raises when the server is away or refuses.
ERRORS = (redis.exceptions.RedisError, OSError)


class RedisLedgerStore:
    """The ledger in Redis; see the module docstring. Thread-safe (redis-py's pool is)."""

    def __init__(self, url: str, worker: str, answers_keep_s: float = 172800.0) -> None:
        self.path = url
        self.worker = worker
        self.ttl = max(1, int(answers_keep_s))
        try:
            self._r: Any = redis.Redis.from_url(
                url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
            )
            self._r.ping()
            self._record = self._r.register_script(_RECORD)
        except (*ERRORS, ValueError) as exc:
            raise LedgerError(f"{url}: cannot open the cost ledger: {exc}") from exc

    def _fail(self, what: str, exc: BaseException) -> LedgerError:
        return LedgerError(f"{self.path}: cannot {what} the cost ledger: {exc}")

    def load(self, ledger: CostLedger) -> None:
        """Add the stored figures to ``ledger``; store its prices."""
        try:
            _load(self._r, ledger)
            self._r.hset(PREFIX + "meta", "pricing", json.dumps(ledger.pricing(), sort_keys=True))
        except ERRORS as exc:
            raise self._fail("read", exc) from exc

    def answer(self, device: str, key: str) -> Answer | None:
        try:
            raw = self._r.get(f"{PREFIX}ans:{device}:{key}")
        except ERRORS as exc:
            raise self._fail("read", exc) from exc
        if raw is None:
            return None
        label, confidence, model = json.loads(raw)
        return Answer(label, float(confidence), model)

    def record(
        self, charges: list[Charge], readings: dict[str, int], at: dt.datetime | None = None
    ) -> list[Usage]:
        """As ``LedgerStore.record``, in one atomic script."""
        day = CostLedger.day_of(at)
        args: list[Any] = [PREFIX, self.ttl, day, len(charges)]
        for c in charges:
            answer = "" if c.answer is None or c.key is None else json.dumps(list(c.answer[:3]))
            args += [c.device, c.key or "", answer, int(c.billed)]
            args += [repr(getattr(c.usage, f)) for f in FIELDS]
        args.append(len(readings))
        for device, total in readings.items():
            args += [device, total]
        try:
            fresh = self._record(args=args)
        except ERRORS as exc:
            raise self._fail("write", exc) from exc
        return [
            c.usage if f else without_cases(c.usage) if c.billed else Usage()
            for c, f in zip(charges, fresh, strict=True)
        ]

    def prune(self, answers_keep_s: float, keep_days: int = LEDGER_KEEP_DAYS) -> int:
        """Answers expire by themselves (their TTL); drop figures older than ``keep_days``."""
        del answers_keep_s
        oldest = CostLedger.day_of(dt.datetime.now(dt.UTC) - dt.timedelta(days=keep_days - 1))
        try:
            for member in self._r.smembers(PREFIX + "usage-index"):
                day, device = member.split("|", 1)
                if day < oldest:
                    self._r.delete(f"{PREFIX}usage:{day}:{device}")
                    self._r.srem(PREFIX + "usage-index", member)
        except ERRORS as exc:
            raise self._fail("write", exc) from exc
        return 0

    def close(self) -> None:
        self._r.close()


def _load(r: Any, ledger: CostLedger) -> None:
    for member in r.smembers(PREFIX + "usage-index"):
        day, device = member.split("|", 1)
        v = r.hgetall(f"{PREFIX}usage:{day}:{device}")
        usage = Usage(
            urgent=int(v.get("urgent", 0)),
            batch=int(v.get("batch", 0)),
            tokens=int(v.get("tokens", 0)),
            spend_urgent=float(v.get("spend_urgent", 0.0)),
            spend_batch=float(v.get("spend_batch", 0.0)),
            calls=int(v.get("calls", 0)),
            prompt_tokens=int(v.get("prompt_tokens", 0)),
            completion_tokens=int(v.get("completion_tokens", 0)),
        )
        ledger.apply(device, usage, day)
    for device, total in r.hgetall(PREFIX + "devices").items():
        ledger.observe(device, int(total))


def redis_summary(url: str) -> dict[str, Any]:
    """``summary_of`` for a ledger in Redis."""
    store = RedisLedgerStore(url, "reader")
    try:
        raw = store._r.hget(PREFIX + "meta", "pricing")
        if raw is None:
            raise LedgerError(f"{url}: the cost ledger holds no prices yet")
        ledger = CostLedger.from_pricing(json.loads(raw))
        _load(store._r, ledger)
    except ERRORS as exc:
        raise store._fail("read", exc) from exc
    finally:
        store.close()
    return ledger.summary()
