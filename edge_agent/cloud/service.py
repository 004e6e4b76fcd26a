"""``edge-agent cloud``: one cloud worker as a service, until SIGTERM/SIGINT or a fatal error."""

from __future__ import annotations

import json
import logging
import signal
import threading
from types import FrameType
from typing import Any

from edge_agent.cloud.ledger import LEDGER_WRITE_INTERVAL_S
from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import Settings

log = logging.getLogger(__name__)


def run_forever(worker: CloudWorker) -> None:
    """Block until ``worker.request_stop``/``stop``, SIGTERM or SIGINT, or a fatal error,
    writing the ledger file every ``LEDGER_WRITE_INTERVAL_S``; then stop the worker.

    Signal handlers are installed only when called from the main thread.
    """
    worker.start()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def handler(signum: int, _frame: FrameType | None) -> None:
            worker.signalled = signum
            worker.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        while not worker.wait_stopped(LEDGER_WRITE_INTERVAL_S):
            worker.write_ledger()
        if worker.signalled:
            log.info("signal %d: stopping", worker.signalled)
    finally:
        worker.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)


def main_cloud(settings: Settings) -> int:
    """Run a cloud worker until SIGINT/SIGTERM; log the ledger summary; return the exit code.

    0 after a requested stop, 1 when the worker gave up (broker refusals, internal
    error). ConfigError and ModelError from start-up propagate to the CLI.
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
