"""``outbox.hard_sync = "normal"``: accepted hard cases still survive SIGKILL.

The same SIGKILL test as ``test_agent_kill.py`` (random kills while hard cases flow, a real
cloud worker answering, every accepted case delivered and scored once, integrity ``ok``),
run with ``EDGE_AGENT_OUTBOX_HARD_SYNC=normal`` and fewer kills. That the setting reaches
SQLite (the ``synchronous`` pragma in force) is checked in
``unit/test_outbox_promises.py::test_hard_sync_sets_the_pragma_in_force_when_hard_cases_are_committed``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.broker import Mosquitto
from tests.integration import test_agent_kill

pytestmark = pytest.mark.integration

KILLS_NORMAL = 10


def test_sigkill_with_hard_sync_normal_loses_no_accepted_hard_case(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_OUTBOX_HARD_SYNC", "normal")  # the agents inherit it
    monkeypatch.setattr(test_agent_kill, "KILLS", KILLS_NORMAL)
    test_agent_kill.test_sigkill_at_random_points_loses_no_accepted_hard_case(
        broker, topic_prefix, tmp_path
    )
