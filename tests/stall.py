"""``edge-agent run`` whose scoring hangs on one marked reading, as a wedged runtime would.

``python -m tests.stall run ...`` is the real command (``edge_agent.cli.main``) with one
change: the fake backend blocks for an hour when a window's first value is ``STALL_MARK``.
Everything else (the agent loop, its watchdog wiring, the link, systemd notifications) is
the code a device runs. Only tests use this.
"""

from __future__ import annotations

import sys
import time

from edge_agent import cli
from edge_agent.scoring.backends.base import BackendOutput, FloatArray
from edge_agent.scoring.backends.fake import FakeBackend

STALL_MARK = 77.0

_score_batch = FakeBackend.score_batch


def _stalling_score_batch(self: FakeBackend, windows: FloatArray) -> BackendOutput:
    if (windows.reshape(windows.shape[0], -1)[:, 0] == STALL_MARK).any():
        time.sleep(3600)
    return _score_batch(self, windows)


FakeBackend.score_batch = _stalling_score_batch  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
