"""Disk full, wherever the suite runs.

``test_faults.py::test_full_disk_drops_telemetry_refuses_hard_cases_and_keeps_scoring`` fills
a real 2 MiB tmpfs, which needs the right to mount (root or ``CAP_SYS_ADMIN``); without it,
that test is skipped with the reason. This one needs no privilege and never skips: the
outbox's SQLite connection is put on a "full disk" by failing every write statement the way
SQLite fails when ``write()`` returns ``ENOSPC`` (``SQLITE_FULL``, "database or disk is
full"), while reads go on. The agent, the link and the outbox above that connection are the
real ones, against a real broker, and the same checks run as on the tmpfs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Mosquitto
from tests.conftest import make_fake_pack
from tests.integration.test_faults import (
    check_degraded_then_recovered,
    fake_agent,
    storage_fault_settings,
)
from tests.mqtt_peer import Collector

pytestmark = pytest.mark.integration

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "BEGIN IMMEDIATE", "COMMIT")


class FullDisk:
    """An SQLite connection on a file system with no space left, while ``full`` is set."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.full = False
        self.refused = 0

    def _check(self, sql: str) -> None:
        if self.full and sql.lstrip().upper().startswith(_WRITES):
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, rows: Iterable[Any]) -> sqlite3.Cursor:
        self._check(sql)
        return self._db.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_full_disk_injected_drops_telemetry_refuses_hard_cases_and_keeps_scoring(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = storage_fault_settings(broker, topic_prefix, tmp_path / "state")
    accepted: list[str] = []
    agent = fake_agent(settings, make_fake_pack(tmp_path / "pack"), accepted)
    disk = FullDisk(agent.outbox._db)
    with agent.outbox._lock:
        agent.outbox._db = disk  # type: ignore[assignment]
    collector = Collector(broker.port, topic_prefix)
    agent.link.start()

    def space(full: bool) -> None:
        with agent.outbox._lock:
            disk.full = full

    try:
        assert agent.link.connected.wait(10)
        during = check_degraded_then_recovered(
            agent, accepted, collector, lambda: space(True), lambda: space(False), caplog
        )
        assert disk.refused >= 1
        assert "database or disk is full" in str(during["status"])
        print(f"\nfull disk (injected SQLITE_FULL): {during}")
    finally:
        collector.close()
        agent.close()
