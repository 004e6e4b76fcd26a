"""``edge-agent cloud``: one cloud worker as a service, until SIGTERM/SIGINT or a fatal error.

Readiness: once the broker granted the worker's shared subscriptions it tells systemd
``READY=1`` (the unit is ``Type=notify``) and publishes its retained ``online`` status on
``<prefix>/cloud/<worker_id>/status`` (``worker.py``), so that an operator, a deployment
script or a test waits on that instead of probing with hard cases.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import Settings
from edge_agent.util.systemd import Notifier

log = logging.getLogger(__name__)

#: How often the main thread looks at the worker (readiness, stop) while it runs.
POLL_S = 0.2
#: Seconds between two prunings of the ledger's old answers (``cloud.answers_keep_s``).
PRUNE_INTERVAL_S = 3600.0


def run_forever(worker: CloudWorker, notifier: Notifier | None = None) -> None:
    """Block until ``worker.request_stop``/``stop``, SIGTERM or SIGINT, or a fatal error;
    then stop the worker. Tells ``notifier`` (systemd) when the worker is first ready and
    what its connection state is.

    Signal handlers are installed only when called from the main thread.
    """
    notifier = notifier or Notifier()
    worker.start()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def handler(signum: int, _frame: FrameType | None) -> None:
            worker.signalled = signum
            worker.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        _serve(worker, notifier)
        if worker.signalled:
            log.info("signal %d: stopping", worker.signalled)
        notifier.stopping("stopping")
    finally:
        worker.stop()
        notifier.close()
        for sig, old in previous.items():
            signal.signal(sig, old)


def _serve(worker: CloudWorker, notifier: Notifier) -> None:
    told_ready = False
    was_ready = False
    pruned_at = time.monotonic()
    while not worker.wait_stopped(POLL_S):
        ready = worker.ready.is_set()
        if ready and not told_ready:
            told_ready = True
            notifier.ready(f"serving group {worker.cloud.group} as {worker.client_id}")
        elif ready != was_ready and told_ready:
            notifier.status(
                f"serving group {worker.cloud.group}"
                if ready
                else f"broker connection lost: {worker.last_error or 'reconnecting'}"
            )
        was_ready = ready
        if time.monotonic() - pruned_at >= PRUNE_INTERVAL_S:
            pruned_at = time.monotonic()
            worker.prune_ledger()


def main_cloud(settings: Settings) -> int:
    """Run a cloud worker until SIGINT/SIGTERM; log the ledger summary; return the exit code.

    0 after a requested stop, 1 when the worker gave up (broker refusals, internal
    error). ConfigError, ModelError and LedgerError from start-up propagate to the CLI.
    """
    worker = CloudWorker(settings)
    log.info("cloud worker %s starting (group %r)", worker.client_id, settings.cloud.group)
    run_forever(worker)
    summary = worker.ledger.summary()
    log.info(
        "cloud worker stopped: counters %s; ledger %s",
        json.dumps(dict(sorted(worker.counters.items()))),
        json.dumps(summary["total"], sort_keys=True),
    )
    if worker.failed:
        log.error("cloud worker failed: %s", worker.failed)
        return 1
    return 0
