"""Model updates on the device: stage, verify, self-test, shadow, promote, watch, commit — or
refuse, reject, roll back. docs/models.md is the operator's side of this.

State lives in the model store under ``<state_dir>/models`` (``models/store.py``); the
files of a release sent over MQTT arrive through ``transfer.py``; the trial's self-test,
shadow and health figures are ``trial.py``. On start the live pack is verified again (sha256
of every file); if that fails the previous one serves.

The steps of one release, each reported on ``<prefix>/<device>/model`` (``ModelEvent``):

1. ``received`` — an install command (``<prefix>/<device>/cmd/model``) names a release folder on
   the device, or sends the signed statement followed by the files in chunks on
   ``<prefix>/<device>/cmd/model/chunk``. Commands are idempotent by release id.
2. ``refused`` — signature, trusted key, sha256, size, file name, version (no downgrade below the
   committed version without a release signed as ``rollback``), input shape. A refusal of the
   release (signature, version, shape, signed sizes) is remembered by release id; one of the
   bytes received (a file whose size or sha256 differs from the statement) is not.
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

import logging
import os
import queue
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from edge_agent.config import Settings
from edge_agent.errors import EdgeAgentError, ReleaseError, ReleaseFilesError
from edge_agent.models.release import (
    RELEASE,
    SIGNATURE,
    read_statement,
    trusted_keys,
    verify_release,
)
from edge_agent.models.store import ModelStore
from edge_agent.rollout.transfer import (
    PROGRESS_EVERY,
    Receiving,
    copy_release,
    stage_statement,
    unfinished,
)
from edge_agent.rollout.trial import Bounds, Health, Shadow
from edge_agent.scoring.backends.base import BackendOptions
from edge_agent.scoring.golden import self_test
from edge_agent.scoring.scorer import Decision, Scorer
from edge_agent.wire.messages import DECODE_ERRORS, ModelCommand, ModelEvent, State, Verdict

log = logging.getLogger(__name__)

#: Commands and chunks waiting for the rollout thread (the sender's window keeps it short).
COMMAND_QUEUE = 100


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
        self._receiving: Receiving | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-rollout", daemon=True)
        self._current = ""  # release id being worked on
        pointer = store.read_pointer()
        # On probation only if the model that serves is the one promoted (not a fallback).
        if pointer.probation and pointer.live is not None and live.pack.path.name == pointer.live:
            bounds = Bounds.of(live.pack, self.settings.rollout)
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
        self.store.commit(self.live.pack)
        self.health = None
        old, self.previous = self.previous, None
        if old is not None:
            old.close()
        self.store.tidy(self.store.named())
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
        self.store.roll_back()
        bad, self.live, self.previous = self.live, back, None
        bad.close()
        if failed:
            self.store.tidy(self.store.named())
        figures = health.figures() if health is not None else {}
        self._finish(self._current, "rolled_back", "", why, **figures)  # not tried again
        return back

    def _load_previous(self, folder: str | None) -> Scorer:
        if folder is None:
            from edge_agent.models.pack import resolve  # noqa: PLC0415 - only on this rare path

            m = self.settings.model
            pack = resolve(m.pack, m.packs_dir, m.store_dir)
        else:
            pack = self.store.open_installed(folder)
        return Scorer.open(pack, BackendOptions.of(self.settings.model))

    # -- rollout thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.store.tidy_unnamed()
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
        except DECODE_ERRORS as exc:
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
            self.event("refused", exc.release, request_id=request_id, reason=str(exc))
            return
        if self._known(rid, request_id):
            return
        self.event(
            "received", rid, request_id=request_id, version=statement.version, name=statement.name
        )
        staging = self.store.staging(rid)
        try:
            copy_release(source, staging, statement, self.settings.rollout.max_file_bytes)
        except (ReleaseError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            # The folder's bytes, not the release: not remembered, a later copy is taken.
            self.event("refused", rid, request_id=request_id, reason=f"cannot copy: {exc}")
            return
        self._candidate(rid, staging, request_id)

    def _begin_receiving(self, cmd: ModelCommand) -> None:
        try:
            rid, statement, probe = stage_statement(self.store, cmd, trusted_keys(self._keys_dir()))
        except ReleaseError as exc:
            self.event("refused", exc.release, request_id=cmd.request_id, reason=str(exc))
            return
        if self._known(rid, cmd.request_id):
            shutil.rmtree(probe, ignore_errors=True)
            return
        if len(statement.files) > self.settings.rollout.max_files or any(
            s > self.settings.rollout.max_file_bytes for s in statement.sizes().values()
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
        self._receiving = Receiving(rid, statement, staging, cmd.request_id)
        self.event(
            "received",
            rid,
            request_id=cmd.request_id,
            version=statement.version,
            name=statement.name,
        )
        self._ask_for_files()

    def _ask_for_files(self, *, resume: bool = False) -> None:
        """Say which bytes are still missing (``resume``: the sender should send them again
        even if it sent them before: they were lost), or go on once the release is complete."""
        r = self._receiving
        if r is None:
            return
        have = r.have()
        if r.missing(have):
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
                chunk_bytes=self.settings.rollout.chunk_bytes,
                resume=resume,
            )
            return
        self._receiving = None
        self._candidate(r.release_id, r.folder, r.request_id)

    def _on_chunk(self, payload: bytes) -> None:
        r = self._receiving
        if r is None:
            self._count("chunks_unexpected")
            return
        outcome = r.take(payload)
        if outcome == "file_done":
            self._ask_for_files()
        elif outcome == "written":
            if r.chunks % PROGRESS_EVERY == 0:
                self._ask_for_files()  # progress: the sender keeps a bounded window ahead of it
        else:
            self._count(f"chunks_{outcome}")
            if outcome == "out_of_order":
                self._ask_for_files(resume=True)  # says where to resume

    def _resume_incoming(self) -> None:
        """After a restart: the newest release whose files were still coming is asked for
        again from where its copy ends; older unfinished ones are removed."""
        try:
            receiving = unfinished(self.store, trusted_keys(self._keys_dir()))
        except ReleaseError as exc:
            log.warning("dropping an unfinished release: %s", exc)
            return
        if receiving is None:
            return
        self._receiving = receiving
        log.info("resuming release %s: asking for the rest of its files", receiving.release_id[:12])
        self._ask_for_files(resume=True)

    def _keys_dir(self) -> Path:
        d = self.settings.rollout.trusted_keys_dir
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
                max_file_bytes=self.settings.rollout.max_file_bytes,
                max_files=self.settings.rollout.max_files,
            )
            self.store.check_upgrade(verified, self.live.pack)
            folder, moved = self.store.install(verified)
        except ReleaseError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, ReleaseFilesError):
                # Bytes that do not match the signed statement (a chunk tampered with or cut
                # on the way) say nothing about the release: refused but not remembered, so
                # the intact files under the same statement are taken without a restart.
                self.event("refused", rid, request_id=request_id, reason=str(exc))
            else:
                self._finish(rid, "refused", request_id, str(exc))
            return
        self.event("staged", rid, request_id=request_id, folder=folder)
        try:
            # Just moved there: every file was hashed by verify_release a moment ago.
            pack = self.store.open_installed(folder, verify=not moved)
            candidate = Scorer.open(pack, BackendOptions.of(self.settings.model))
        except EdgeAgentError as exc:
            self._finish(rid, "selftest_failed", request_id, f"does not load: {exc}")
            self.store.tidy(self.store.named())
            return
        why = self_test(candidate)
        if why:
            candidate.close()
            self._finish(rid, "selftest_failed", request_id, why)
            self.store.tidy(self.store.named())
            return
        bounds = Bounds.of(candidate.pack, self.settings.rollout)
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
        shadow = Shadow(candidate, bounds, self.settings.rollout.shadow_queue)
        self.event("shadow", rid, request_id=request_id, readings=bounds.shadow_readings)
        shadow.start()
        self.shadow = shadow
        finished = shadow.done.wait(self.settings.rollout.shadow_timeout_s)
        self.shadow = None
        shadow.stop()
        if self._stop.is_set():  # the agent stops: a trial cut short decides nothing
            candidate.close()
            self.event("rejected", rid, request_id=request_id, reason="the agent stopped")
            self.store.tidy(self.store.named())
            return
        figures = shadow.figures()
        why = (
            shadow.verdict() if finished else "not enough readings within rollout.shadow_timeout_s"
        )
        if why:
            candidate.close()
            self._finish(rid, "rejected", request_id, why, **figures)
            self.store.tidy(self.store.named())
            return
        self._promote(rid, folder, candidate, request_id=request_id, figures=figures, bounds=bounds)

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
        baseline = figures["hard_rate_live"] if figures else None
        self.store.promote(folder, rid, candidate.pack, baseline, committed=forced)
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
            self.health = Health(bounds, baseline or 0.0)
        self._finish(rid, "promoted", request_id, **(figures or {}), forced=forced)
