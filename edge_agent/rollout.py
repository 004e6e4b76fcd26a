"""Model updates on the device: stage, verify, self-test, shadow, promote, watch, commit — or
refuse, reject, roll back. docs/models.md is the operator's side of this.

State lives under ``<state_dir>/models``::

    incoming/<release id>/      files of a release being received (the only place written to
                                from outside; names checked, sizes capped)
    packs/<name>-<version>-<id>/ verified releases, never changed once there
    current.json                the pointer: which installed pack serves, the previous one,
                                whether the live one is still on probation, the committed
                                version per pack name

The pointer is replaced whole with ``os.replace`` and the folder fsynced, so at any instant —
a SIGKILL included — it names exactly one pack (or none: the configured ``model.pack``
serves), and a pack is only ever named once it is completely in ``packs/``. On start the live
pack is verified again (sha256 of every file); if that fails the previous one serves.

The steps of one release, each reported on ``<prefix>/<device>/model`` (``ModelEvent``):

1. ``received`` — an install command (``<prefix>/<device>/cmd/model``) names a release folder on
   the device, or sends the signed statement followed by the files in chunks on
   ``<prefix>/<device>/cmd/model/chunk``. Commands are idempotent by release id.
2. ``refused`` — signature, trusted key, sha256, size, file name, version (no downgrade below the
   committed version without a release signed as ``rollback``), input shape.
3. ``selftest_failed`` — the candidate, loaded beside the live model, must reproduce the
   golden inputs of its own manifest (``[selftest]``).
4. ``shadow`` → ``rejected`` or ``promoted`` — the candidate scores live readings on a thread of
   its own (a bounded queue: when it is full, readings are skipped for the shadow and counted,
   never delayed); agreement with the live model, hard-case rate and p99 latency must stay
   within the release's bounds (``[rollout]`` in its manifest, else the config).
5. ``committed`` or ``rolled_back`` — after promotion the new model is on probation for a health
   window: errors, p99 latency and hard-case rate (against the old model's rate in the shadow
   phase). Past a bound the device goes back to the previous model by itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from .backends import BackendOptions
from .config import RolloutSettings, Settings
from .errors import EdgeAgentError, ModelError, ReleaseError
from .golden import self_test
from .messages import Verdict
from .modelpack import ModelPack, open_pack
from .readings import Reading
from .release import (
    RELEASE,
    SIGNATURE,
    Release,
    VerifiedRelease,
    check_name,
    read_statement,
    trusted_keys,
    verify_release,
    version_key,
)
from .scorer import Decision, Scorer

log = logging.getLogger(__name__)

POINTER = "current.json"
#: While a release comes in chunks, the device reports how far it got every this many chunks;
#: the sender keeps at most ``WINDOW_CHUNKS`` beyond that (push.py), so the command queue
#: (``COMMAND_QUEUE``) never overflows.
PROGRESS_EVERY = 8
WINDOW_CHUNKS = 32
COMMAND_QUEUE = 100


# -- the pointer and the installed packs ---------------------------------------------------


class Pointer(msgspec.Struct, forbid_unknown_fields=True):
    v: int = 1
    live: str | None = None  #: folder under packs/ that serves; None: the configured pack
    previous: str | None = None  #: what served before ``live`` (None: the configured pack)
    probation: bool = False  #: ``live`` was promoted and its health window is not over
    baseline_hard_rate: float | None = None  #: the old model's hard rate, for the health window
    release: str = ""  #: release id of ``live``
    committed: dict[str, str] = {}  #: pack name -> last committed version


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """The device's installed packs and the pointer to the live one."""

    def __init__(self, state_dir: str | Path, store_dir: str = "") -> None:
        self.root = Path(state_dir) / "models"
        self.packs = self.root / "packs"
        self.incoming = self.root / "incoming"
        self.pointer_path = self.root / POINTER
        self.store_dir = store_dir

    def read_pointer(self) -> Pointer:
        try:
            data = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return Pointer()
        except OSError as exc:
            log.error("cannot read %s: %s; serving the configured pack", self.pointer_path, exc)
            return Pointer()
        try:
            return msgspec.json.decode(data, type=Pointer)
        except msgspec.MsgspecError as exc:
            log.error("%s is not valid (%s); serving the configured pack", self.pointer_path, exc)
            return Pointer()

    def write_pointer(self, pointer: Pointer) -> None:
        """Replace the pointer atomically and durably."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (POINTER + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgspec.json.encode(pointer))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.pointer_path)
        _fsync_dir(self.root)

    def open_installed(self, folder: str, *, verify: bool = True) -> ModelPack:
        """An installed pack; ``verify=False`` only right after ``install``, whose release
        was verified file by file just before the rename that put it there."""
        pack = open_pack(self.packs / check_name(folder), self.store_dir)
        if verify:
            pack.verify()
        else:
            pack.verified = True
        return pack

    def live_pack(self) -> tuple[ModelPack | None, Pointer]:
        """The installed pack the pointer names, verified; None: serve the configured pack."""
        pointer = self.read_pointer()
        for folder in (pointer.live, pointer.previous):
            if folder is None:
                return None, pointer
            try:
                return self.open_installed(folder), pointer
            except (ModelError, ReleaseError) as exc:
                log.error("installed pack %s cannot serve: %s", folder, exc)
        return None, pointer

    def staging(self, release_id: str) -> Path:
        folder = self.incoming / check_name(release_id)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def install(self, verified: VerifiedRelease) -> tuple[str, bool]:
        """Move a verified staged release into packs/ (one rename); returns its folder name and
        whether it was moved there now (False: it was installed before, the copy is dropped)."""
        m = verified.pack.manifest
        name = check_name(f"{m.name}-{m.version}-{verified.id[:12]}")
        dest = self.packs / name
        self.packs.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(verified.pack.path, ignore_errors=True)
            return name, False
        for child in verified.pack.path.iterdir():  # data on disk before the rename
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(verified.pack.path, dest)
        _fsync_dir(self.packs)
        return name, True

    def tidy(self, keep: set[str]) -> None:
        """Remove installed packs that the pointer does not name."""
        if self.packs.is_dir():
            for child in self.packs.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)


# -- bounds, shadow and health ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bounds:
    shadow_readings: int
    min_agreement: float
    max_hard_rate_increase: float
    max_p99_ms: float
    max_cloud_agreement_drop: float
    min_cloud_verdicts: int
    health_readings: int
    health_max_hard_rate_increase: float
    health_max_error_rate: float

    @classmethod
    def of(cls, pack: ModelPack, cfg: RolloutSettings) -> Bounds:
        own = pack.manifest.rollout
        values = {}
        for name in cls.__slots__:
            mine = getattr(own, name) if own is not None else None
            values[name] = mine if mine is not None else getattr(cfg, name)
        return cls(**values)


def _p99(xs: list[float] | deque[float]) -> float:
    return float(np.percentile(np.fromiter(xs, dtype=np.float64), 99)) if xs else 0.0


class Shadow:
    """The candidate scores what the live model scored, on its own thread, off the hot path."""

    def __init__(self, candidate: Scorer, bounds: Bounds, queue_size: int) -> None:
        self.candidate = candidate
        self.bounds = bounds
        self._queue: queue.Queue[tuple[Reading, str, bool]] = queue.Queue(queue_size)
        self.seen = 0
        self.agree = 0
        self.live_hard = 0
        self.cand_hard = 0
        self.errors = 0
        self.skipped = 0
        self.latencies_ms: list[float] = []
        # Cloud verdicts for readings both models scored: seq -> label, both ways round, since
        # a verdict may come before or after the shadow got to its reading.
        self._lock = threading.Lock()
        self._scored: OrderedDict[int, tuple[str, str]] = OrderedDict()  # candidate, live
        self._verdicts: OrderedDict[int, str] = OrderedDict()
        self.cloud = 0
        self.cloud_agree_candidate = 0
        self.cloud_agree_live = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-shadow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, d: Decision) -> None:
        """Called on the scoring thread for every live decision; never blocks."""
        try:
            self._queue.put_nowait((d.reading, d.label, d.route == "hard"))
        except queue.Full:
            self.skipped += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set() and self.seen < self.bounds.shadow_readings:
            try:
                reading, live_label, live_hard = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            t0 = time.perf_counter_ns()
            try:
                (d,) = self.candidate.score([reading])
            except EdgeAgentError as exc:
                self.errors += 1
                log.warning("candidate failed on a shadow reading: %s", exc)
                continue
            finally:
                self.seen += 1
            self.latencies_ms.append((time.perf_counter_ns() - t0) / 1e6)
            self._match(reading.seq, d.label, live_label)
            self.agree += d.label == live_label
            self.live_hard += live_hard
            self.cand_hard += d.route == "hard"
        self.done.set()

    def on_verdict(self, v: Verdict) -> None:
        """A cloud verdict (link thread): compare it with both models' answers."""
        if v.no_verdict is not None or not v.label:
            return
        with self._lock:
            both = self._scored.pop(v.seq, None)
            if both is None:
                self._verdicts[v.seq] = v.label
                while len(self._verdicts) > 10_000:
                    self._verdicts.popitem(last=False)
                return
            self._count_cloud(v.label, *both)

    def _match(self, seq: int, candidate: str, live: str) -> None:
        with self._lock:
            label = self._verdicts.pop(seq, None)
            if label is not None:
                self._count_cloud(label, candidate, live)
                return
            self._scored[seq] = (candidate, live)
            while len(self._scored) > 10_000:
                self._scored.popitem(last=False)

    def _count_cloud(self, cloud: str, candidate: str, live: str) -> None:
        self.cloud += 1
        self.cloud_agree_candidate += candidate == cloud
        self.cloud_agree_live += live == cloud

    def figures(self) -> dict[str, Any]:
        n = max(1, self.seen)
        c = max(1, self.cloud)
        return {
            "cloud_verdicts": self.cloud,
            "cloud_agreement_candidate": round(self.cloud_agree_candidate / c, 4),
            "cloud_agreement_live": round(self.cloud_agree_live / c, 4),
            "readings": self.seen,
            "agreement": round(self.agree / n, 4),
            "hard_rate_live": round(self.live_hard / n, 4),
            "hard_rate_candidate": round(self.cand_hard / n, 4),
            "p99_ms": round(_p99(self.latencies_ms), 3),
            "errors": self.errors,
            "skipped": self.skipped,
        }

    def verdict(self) -> str:
        """ "" when the candidate stayed within its bounds, else why not."""
        f, b = self.figures(), self.bounds
        if self.errors:
            return f"{self.errors} scoring errors in shadow"
        if f["agreement"] < b.min_agreement:
            return f"agreement {f['agreement']} with the live model < {b.min_agreement}"
        if f["hard_rate_candidate"] > f["hard_rate_live"] + b.max_hard_rate_increase:
            return (
                f"hard-case rate {f['hard_rate_candidate']} > live {f['hard_rate_live']}"
                f" + {b.max_hard_rate_increase}"
            )
        if f["p99_ms"] > b.max_p99_ms:
            return f"p99 {f['p99_ms']} ms > {b.max_p99_ms} ms"
        if (
            self.cloud >= b.min_cloud_verdicts
            and f["cloud_agreement_candidate"]
            < f["cloud_agreement_live"] - b.max_cloud_agreement_drop
        ):
            return (
                f"agrees with the cloud's verdicts on {f['cloud_agreement_candidate']} of"
                f" {self.cloud} hard cases, the live model on {f['cloud_agreement_live']}"
            )
        return ""


@dataclass(slots=True)
class Health:
    """The probation of a promoted model, fed from the scoring thread."""

    bounds: Bounds
    baseline_hard_rate: float
    seen: int = 0
    hard: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def observe(self, d: Decision) -> None:
        self.seen += 1
        self.hard += d.route == "hard"
        self.latencies_ms.append(d.latency_ms)

    def finished(self) -> bool:
        return self.seen + self.errors >= self.bounds.health_readings

    def verdict(self) -> str:
        b = self.bounds
        n = max(1, self.seen + self.errors)
        if self.errors / n > b.health_max_error_rate:
            return f"{self.errors} scoring errors in {n} readings"
        rate = self.hard / max(1, self.seen)
        if rate > self.baseline_hard_rate + b.health_max_hard_rate_increase:
            return (
                f"hard-case rate {rate:.3f} > {self.baseline_hard_rate:.3f} (before)"
                f" + {b.health_max_hard_rate_increase}"
            )
        p99 = _p99(self.latencies_ms)
        if p99 > b.max_p99_ms:
            return f"p99 {p99:.2f} ms > {b.max_p99_ms} ms"
        return ""

    def figures(self) -> dict[str, Any]:
        return {
            "readings": self.seen,
            "errors": self.errors,
            "hard_rate": round(self.hard / max(1, self.seen), 4),
            "p99_ms": round(_p99(self.latencies_ms), 3),
        }


# -- messages --------------------------------------------------------------------------------

Action = Literal["install", "status"]
State = Literal[
    "received",
    "awaiting_files",
    "refused",
    "staged",
    "selftest_failed",
    "shadow",
    "rejected",
    "promoted",
    "committed",
    "rolled_back",
    "status",
]


class ModelCommand(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """On ``<prefix>/<device>/cmd/model``: install a release, or ask what serves."""

    v: int
    action: Action
    request_id: str = ""
    #: A release folder on the device (or a ``file://`` URL of one).
    path: str = ""
    #: Or the release itself, over MQTT: ``release.json`` and ``release.sig``, base64; the files
    #: follow as ``ModelChunk`` messages.
    statement: str = ""
    signature: str = ""


class ModelChunk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """On ``<prefix>/<device>/cmd/model/chunk``: bytes ``offset``.. of one file of a release."""

    v: int
    release: str
    file: str
    offset: int
    data: str  #: base64
    sha256: str  #: of the decoded data


class ModelEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """On ``<prefix>/<device>/model``: one step of a release, or the answer to ``status``."""

    v: int
    device: str
    state: State
    live: str
    release: str = ""
    request_id: str = ""
    reason: str = ""
    details: dict[str, Any] = {}


# -- the manager -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Receiving:
    """A release coming over MQTT in chunks."""

    release_id: str
    statement: Release
    folder: Path
    request_id: str
    last_ask: float = 0.0
    chunks: int = 0

    @property
    def sizes(self) -> dict[str, int]:
        return self.statement.sizes()


class Rollout:
    """Runs releases one at a time on its own thread; the scoring thread calls ``observe``
    for every live decision and ``apply`` between groups (the only place the scorer changes)."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        live: Scorer,
        *,
        report: Callable[[ModelEvent], None],
    ) -> None:
        self.settings = settings
        self.cfg = settings.rollout
        self.store = store
        self.live = live
        self.previous: Scorer | None = None
        self._report = report
        self.device = settings.device_id
        self.counters: dict[str, int] = {}
        self.events: deque[ModelEvent] = deque(maxlen=1000)
        self.shadow: Shadow | None = None
        self.health: Health | None = None
        self._commands: queue.Queue[tuple[str, bytes]] = queue.Queue(COMMAND_QUEUE)
        self._swap: Scorer | None = None
        self._swap_done = threading.Event()
        self._outcomes: OrderedDict[str, ModelEvent] = OrderedDict()
        self._receiving: _Receiving | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-rollout", daemon=True)
        self._current = ""  # release id being worked on
        pointer = store.read_pointer()
        # On probation only if the model that serves is the one promoted (not a fallback).
        if pointer.probation and pointer.live is not None and live.pack.path.name == pointer.live:
            bounds = Bounds.of(live.pack, self.cfg)
            self.health = Health(bounds, pointer.baseline_hard_rate or 0.0)
            self._current = pointer.release
            log.info("model %s is on probation (health window restarts)", live.ref)

    # -- any thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.shadow is not None:
            self.shadow.stop()
        if self._thread.is_alive():
            self._thread.join(5)

    def submit(self, topic: str, payload: bytes) -> None:
        """A command or chunk from the link thread; never blocks the link."""
        try:
            self._commands.put_nowait((topic, payload))
        except queue.Full:
            self._count("commands_dropped")
            log.error("model command queue full: a message on %s dropped", topic)

    def snapshot(self) -> dict[str, Any]:
        """For telemetry: what happened to releases, and the trial under way if any."""
        shadow, health = self.shadow, self.health
        return {
            "events": dict(self.counters),
            "shadow": shadow.figures() if shadow is not None else {},
            "probation": health.figures() if health is not None else {},
        }

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def event(
        self,
        state: State,
        release: str = "",
        *,
        request_id: str = "",
        reason: str = "",
        **details: Any,
    ) -> ModelEvent:
        ev = ModelEvent(
            v=1,
            device=self.device,
            state=state,
            live=self.live.ref,
            release=release,
            request_id=request_id,
            reason=reason,
            details=details,
        )
        self.events.append(ev)
        self._count(state)
        level = (
            logging.WARNING
            if state in ("refused", "selftest_failed", "rejected", "rolled_back")
            else logging.INFO
        )
        log.log(
            level,
            "model release %s: %s%s",
            release[:12] or "-",
            state,
            f" ({reason})" if reason else "",
        )
        self._report(ev)
        return ev

    # -- scoring thread -----------------------------------------------------------------

    def on_verdict(self, v: Verdict) -> None:
        """Reconciler listener (link thread): cloud verdicts feed the shadow comparison."""
        shadow = self.shadow
        if shadow is not None:
            shadow.on_verdict(v)

    def observe(self, d: Decision) -> None:
        shadow, health = self.shadow, self.health
        if shadow is not None:
            shadow.offer(d)
        if health is not None:
            health.observe(d)

    def scoring_failed(self, exc: EdgeAgentError) -> bool:
        """The live model raised while scoring. On probation: roll back and return True (the
        caller scores the group again); otherwise False (the caller re-raises)."""
        if self.health is None:
            return False
        self.health.errors += 1
        if self.health.verdict():
            self._roll_back(f"the new model failed: {exc}")
            return True
        return False

    def apply(self) -> Scorer | None:
        """Between groups on the scoring thread: the scorer to use from now, if it changes."""
        swap, self._swap = self._swap, None
        if swap is not None:
            self.previous, self.live = self.live, swap
            self._swap_done.set()
            return swap
        health = self.health
        if health is not None and health.finished():
            why = health.verdict()
            if why:
                return self._roll_back(why)
            self._commit(health)
        return None

    def _commit(self, health: Health) -> None:
        pointer = self.store.read_pointer()
        m = self.live.pack.manifest
        pointer.probation = False
        pointer.committed = {**pointer.committed, m.name: m.version}
        self.store.write_pointer(pointer)
        self.health = None
        old, self.previous = self.previous, None
        if old is not None:
            old.close()
        self.store.tidy({x for x in (pointer.live, pointer.previous) if x})
        self._finish(self._current, "committed", "", **health.figures())

    def _roll_back(self, why: str) -> Scorer | None:
        health, self.health = self.health, None
        pointer = self.store.read_pointer()
        failed = pointer.live
        back: Scorer | None = self.previous
        if back is None:  # restarted during probation: load what served before
            try:
                back = self._load_previous(pointer.previous)
            except EdgeAgentError as exc:
                log.error("cannot roll back, the previous model does not load: %s", exc)
                self.event("rolled_back", self._current, reason=f"{why}; roll back failed: {exc}")
                return None
        pointer.live, pointer.previous = pointer.previous, None
        pointer.probation = False
        pointer.release = ""
        self.store.write_pointer(pointer)
        bad, self.live, self.previous = self.live, back, None
        bad.close()
        if failed:
            self.store.tidy({x for x in (pointer.live,) if x})
        figures = health.figures() if health is not None else {}
        self._finish(self._current, "rolled_back", "", why, **figures)  # not tried again
        return back

    def _load_previous(self, folder: str | None) -> Scorer:
        if folder is None:
            from .modelpack import resolve  # noqa: PLC0415 - only on this rare path

            m = self.settings.model
            pack = resolve(m.pack, m.packs_dir, m.store_dir)
        else:
            pack = self.store.open_installed(folder)
        return Scorer.open(pack, self._options())

    def _options(self) -> BackendOptions:
        m = self.settings.model
        return BackendOptions(
            intra_op_threads=m.intra_op_threads, inter_op_threads=m.inter_op_threads
        )

    # -- rollout thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._resume_incoming()
        except (EdgeAgentError, OSError):
            self._count("errors")
            log.exception("cannot resume an interrupted release")
        while not self._stop.is_set():
            try:
                topic, payload = self._commands.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if topic.endswith("/chunk"):
                    self._on_chunk(payload)
                else:
                    self._on_command(payload)
            except (EdgeAgentError, OSError):  # a failed step never stops the agent
                self._count("errors")
                log.exception("model command failed")

    def _on_command(self, payload: bytes) -> None:
        try:
            cmd = msgspec.json.decode(payload, type=ModelCommand)
        except msgspec.MsgspecError as exc:
            self._count("commands_malformed")
            self.event("refused", reason=f"malformed command: {exc}")
            return
        if cmd.action == "status":
            pointer = self.store.read_pointer()
            self.event(
                "status",
                pointer.release,
                request_id=cmd.request_id,
                probation=pointer.probation,
                committed=pointer.committed,
            )
            return
        if cmd.path:
            folder = Path(cmd.path.removeprefix("file://"))
            self._install_from(folder, cmd.request_id)
        elif cmd.statement:
            self._begin_receiving(cmd)
        else:
            self.event(
                "refused",
                request_id=cmd.request_id,
                reason="an install command needs 'path' or 'statement'",
            )

    def _known(self, rid: str, request_id: str) -> bool:
        """Idempotency: a release already decided is answered with its outcome again."""
        done = self._outcomes.get(rid)
        if done is None and self.store.read_pointer().release == rid and self.health is None:
            done = ModelEvent(
                v=1, device=self.device, state="committed", live=self.live.ref, release=rid
            )
        if done is None:
            return False
        self.event(done.state, rid, request_id=request_id, reason=done.reason, repeated=True)
        return True

    def _install_from(self, source: Path, request_id: str) -> None:
        """Copy a release folder into staging (only the files its signed statement names)."""
        keys = trusted_keys(self._keys_dir())
        try:
            rid, statement, _ = read_statement(source, keys)
        except ReleaseError as exc:
            self.event("refused", request_id=request_id, reason=str(exc))
            return
        if self._known(rid, request_id):
            return
        self.event(
            "received", rid, request_id=request_id, version=statement.version, name=statement.name
        )
        staging = self.store.staging(rid)
        try:
            for name in (RELEASE, SIGNATURE, *statement.names()):
                self._copy_in(source / check_name(name), staging / name)
        except (ReleaseError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self._finish(rid, "refused", request_id, f"cannot copy the release: {exc}")
            return
        self._candidate(rid, staging, request_id)

    def _copy_in(self, src: Path, dest: Path) -> None:
        size = src.stat().st_size
        if size > self.cfg.max_file_bytes:
            raise ReleaseError(f"{src.name}: {size} bytes, over rollout.max_file_bytes")
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)

    def _begin_receiving(self, cmd: ModelCommand) -> None:
        try:
            body = base64.b64decode(cmd.statement, validate=True)
            sig = base64.b64decode(cmd.signature, validate=True)
        except (binascii.Error, ValueError):
            self.event(
                "refused", request_id=cmd.request_id, reason="statement/signature not base64"
            )
            return
        probe = self.store.incoming / ".probe"
        shutil.rmtree(probe, ignore_errors=True)
        probe.mkdir(parents=True)
        (probe / RELEASE).write_bytes(body[: 256 * 1024])
        (probe / SIGNATURE).write_bytes(base64.b64encode(sig))
        try:
            rid, statement, _ = read_statement(probe, trusted_keys(self._keys_dir()))
        except ReleaseError as exc:
            self.event("refused", request_id=cmd.request_id, reason=str(exc))
            return
        if self._known(rid, cmd.request_id):
            shutil.rmtree(probe, ignore_errors=True)
            return
        if len(statement.files) > self.cfg.max_files or any(
            s > self.cfg.max_file_bytes for s in statement.sizes().values()
        ):
            shutil.rmtree(probe, ignore_errors=True)
            self._finish(
                rid,
                "refused",
                cmd.request_id,
                "a file is over rollout.max_file_bytes or there are too many files",
            )
            return
        staging = self.store.staging(rid)
        for name in (RELEASE, SIGNATURE):
            os.replace(probe / name, staging / name)
        shutil.rmtree(probe, ignore_errors=True)
        self._receiving = _Receiving(rid, statement, staging, cmd.request_id)
        self.event(
            "received",
            rid,
            request_id=cmd.request_id,
            version=statement.version,
            name=statement.name,
        )
        self._ask_for_files()

    def _have(self, r: _Receiving) -> dict[str, int]:
        have = {}
        for name in r.sizes:
            done = r.folder / name
            part = r.folder / (name + ".part")
            have[name] = (
                done.stat().st_size
                if done.exists()
                else part.stat().st_size
                if part.exists()
                else 0
            )
        return have

    def _ask_for_files(self, *, resume: bool = False) -> None:
        """Say which bytes are still missing (``resume``: the sender should send them again
        even if it sent them before: they were lost), or go on once the release is complete."""
        r = self._receiving
        if r is None:
            return
        have = self._have(r)
        missing = {n: s for n, s in r.sizes.items() if have[n] < s or not (r.folder / n).exists()}
        if missing:
            now = time.monotonic()
            if resume and now - r.last_ask < 1.0:
                return  # one request a second is enough while chunks keep coming out of order
            r.last_ask = now
            self.event(
                "awaiting_files",
                r.release_id,
                request_id=r.request_id,
                have=have,
                sizes=r.sizes,
                chunk_bytes=self.cfg.chunk_bytes,
                resume=resume,
            )
            return
        self._receiving = None
        self._candidate(r.release_id, r.folder, r.request_id)

    def _on_chunk(self, payload: bytes) -> None:
        r = self._receiving
        try:
            chunk = msgspec.json.decode(payload, type=ModelChunk)
            data = base64.b64decode(chunk.data, validate=True)
        except (msgspec.MsgspecError, binascii.Error, ValueError):
            self._count("chunks_malformed")
            return
        if r is None or chunk.release != r.release_id:
            self._count("chunks_unexpected")
            return
        size = r.sizes.get(chunk.file)
        if size is None:
            self._count("chunks_unexpected")
            return
        if hashlib.sha256(data).hexdigest() != chunk.sha256:
            self._count("chunks_corrupt")
            return
        part = r.folder / (check_name(chunk.file) + ".part")
        have = part.stat().st_size if part.exists() else 0
        if (r.folder / chunk.file).exists() or chunk.offset + len(data) <= have:
            self._count("chunks_duplicate")
            return
        if chunk.offset != have or have + len(data) > size:
            self._count("chunks_out_of_order")
            self._ask_for_files(resume=True)  # says where to resume
            return
        with open(part, "ab") as fh:
            fh.write(data)
            if have + len(data) == size:  # complete: on disk before it gets its name
                fh.flush()
                os.fsync(fh.fileno())
        r.chunks += 1
        if have + len(data) == size:
            os.replace(part, r.folder / chunk.file)
            self._ask_for_files()
        elif r.chunks % PROGRESS_EVERY == 0:
            self._ask_for_files()  # progress: the sender keeps a bounded window ahead of it

    def _resume_incoming(self) -> None:
        """After a restart: the newest release whose files were still coming is asked for
        again from where its copy ends; older unfinished ones are removed."""
        if not self.store.incoming.is_dir():
            return
        folders = sorted(
            (d for d in self.store.incoming.iterdir() if d.is_dir() and d.name != ".probe"),
            key=lambda d: d.stat().st_mtime,
        )
        keys = trusted_keys(self._keys_dir())
        for folder in folders[:-1]:
            shutil.rmtree(folder, ignore_errors=True)
        if not folders:
            return
        folder = folders[-1]
        try:
            rid, statement, _ = read_statement(folder, keys)
        except ReleaseError as exc:
            log.warning("dropping the unfinished release in %s: %s", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return
        if rid != folder.name:
            shutil.rmtree(folder, ignore_errors=True)
            return
        self._receiving = _Receiving(rid, statement, folder, "")
        log.info("resuming release %s: asking for the rest of its files", rid[:12])
        self._ask_for_files(resume=True)

    def _keys_dir(self) -> Path:
        d = self.cfg.trusted_keys_dir
        return Path(d) if d else Path(self.settings.device.state_dir) / "trusted-keys"

    def _finish(
        self, rid: str, state: State, request_id: str, reason: str = "", **details: Any
    ) -> None:
        ev = self.event(state, rid, request_id=request_id, reason=reason, **details)
        self._outcomes[rid] = ev
        while len(self._outcomes) > 100:
            self._outcomes.popitem(last=False)

    def _candidate(self, rid: str, staging: Path, request_id: str) -> None:
        """A complete staged release: verify, check version and shape, self-test, shadow."""
        self._current = rid
        try:
            verified = verify_release(
                staging,
                trusted_keys(self._keys_dir()),
                max_file_bytes=self.cfg.max_file_bytes,
                max_files=self.cfg.max_files,
            )
            self._check_version(verified)
            folder, moved = self.store.install(verified)
        except ReleaseError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self._finish(rid, "refused", request_id, str(exc))
            return
        self.event("staged", rid, request_id=request_id, folder=folder)
        try:
            # Just moved there: every file was hashed by verify_release a moment ago.
            pack = self.store.open_installed(folder, verify=not moved)
            candidate = Scorer.open(pack, self._options())
        except EdgeAgentError as exc:
            self._finish(rid, "selftest_failed", request_id, f"does not load: {exc}")
            self.store.tidy(self._pointer_folders())
            return
        why = self_test(candidate)
        if why:
            candidate.close()
            self._finish(rid, "selftest_failed", request_id, why)
            self.store.tidy(self._pointer_folders())
            return
        bounds = Bounds.of(candidate.pack, self.cfg)
        if verified.release.rollback:  # an operator's signed rollback: no trial
            self._promote(
                rid,
                folder,
                candidate,
                request_id=request_id,
                figures=None,
                bounds=bounds,
                forced=True,
            )
            return
        shadow = Shadow(candidate, bounds, self.cfg.shadow_queue)
        self.event("shadow", rid, request_id=request_id, readings=bounds.shadow_readings)
        shadow.start()
        self.shadow = shadow
        finished = shadow.done.wait(self.settings.rollout.shadow_timeout_s)
        self.shadow = None
        shadow.stop()
        if self._stop.is_set():  # the agent stops: a trial cut short decides nothing
            candidate.close()
            self.event("rejected", rid, request_id=request_id, reason="the agent stopped")
            self.store.tidy(self._pointer_folders())
            return
        figures = shadow.figures()
        why = (
            shadow.verdict() if finished else "not enough readings within rollout.shadow_timeout_s"
        )
        if why:
            candidate.close()
            self._finish(rid, "rejected", request_id, why, **figures)
            self.store.tidy(self._pointer_folders())
            return
        self._promote(rid, folder, candidate, request_id=request_id, figures=figures, bounds=bounds)

    def _pointer_folders(self) -> set[str]:
        p = self.store.read_pointer()
        return {x for x in (p.live, p.previous) if x}

    def _check_version(self, verified: VerifiedRelease) -> None:
        """No downgrade below the committed version (unless signed as a rollback), the same
        input shape as the live model."""
        m = verified.pack.manifest
        if tuple(m.input.shape) != self.live.shape:
            raise ReleaseError(
                f"input shape {m.input.shape} differs from the live model's {list(self.live.shape)}"
            )
        committed = self.store.read_pointer().committed.get(m.name)
        if committed is None and self.live.pack.manifest.name == m.name:
            committed = self.live.pack.manifest.version
        if committed is None or verified.release.rollback:
            return
        if version_key(m.version) < version_key(committed):
            raise ReleaseError(
                f"version {m.version} is lower than the committed {committed}"
                " (a downgrade needs a release signed with --rollback)"
            )
        if (
            version_key(m.version) == version_key(committed)
            and self.live.ref == f"{m.name}@{m.version}"
        ):
            raise ReleaseError(f"version {m.version} is already live")

    def _promote(
        self,
        rid: str,
        folder: str,
        candidate: Scorer,
        *,
        request_id: str,
        figures: dict[str, Any] | None,
        bounds: Bounds,
        forced: bool = False,
    ) -> None:
        pointer = self.store.read_pointer()
        pointer.previous, pointer.live = pointer.live, folder
        pointer.release = rid
        pointer.probation = not forced
        pointer.baseline_hard_rate = figures["hard_rate_live"] if figures else None
        if forced:
            m = candidate.pack.manifest
            pointer.committed = {**pointer.committed, m.name: m.version}
        self.store.write_pointer(pointer)
        self._swap_done.clear()
        self._swap = candidate
        while not self._swap_done.wait(0.5):  # the scoring thread swaps between two groups
            if self._stop.is_set():
                return
        if forced:
            old, self.previous = self.previous, None
            if old is not None:
                old.close()
        else:
            self.health = Health(bounds, pointer.baseline_hard_rate or 0.0)
        self._finish(rid, "promoted", request_id, **(figures or {}), forced=forced)
