"""The shared helpers of edge_agent/util: each is what several rooms used to write themselves."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest

from edge_agent.util.backoff import full_jitter
from edge_agent.util.files import Durability, UnreadableFile, atomic_write, file_sha256, read_toml
from edge_agent.util.progress import Progress
from edge_agent.util.stats import percentile, percentiles


@pytest.mark.parametrize("durability", list(Durability))
def test_atomic_write_replaces_the_file_and_syncs_as_asked(
    tmp_path: Path, durability: Durability, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)  # the module files.py calls
    atomic_write(target, b"new", durability)
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    expected = {Durability.RENAME: 0, Durability.DATA: 1, Durability.FOLDER: 2}[durability]
    assert len(synced) == expected


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ledger.json"
    target.write_bytes(b"old")

    def broken_replace(_src: object, _dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)  # the module files.py calls
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_file_sha256_and_read_toml(tmp_path: Path) -> None:
    blob = tmp_path / "model.bin"
    blob.write_bytes(b"x" * 3_000_000)
    assert file_sha256(blob) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    good = tmp_path / "a.toml"
    good.write_text('[model]\npack = "p"\n')
    assert read_toml(good) == {"model": {"pack": "p"}}
    bad = tmp_path / "b.toml"
    bad.write_text("[model\n")
    with pytest.raises(UnreadableFile, match="not valid TOML"):
        read_toml(bad)
    with pytest.raises(FileNotFoundError):
        read_toml(tmp_path / "missing.toml")


def test_percentiles_of_samples_and_of_nothing() -> None:
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    got = percentiles(list(range(1, 101)))
    assert got["p50"] == pytest.approx(50.5)
    assert got["p99"] == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_full_jitter_stays_within_its_bounds() -> None:
    for attempt in range(0, 30):
        delay = full_jitter(0.2, 30.0, attempt)
        assert 0.2 <= delay <= min(30.0, 0.2 * 2**attempt)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal_and_writes_plain_lines_elsewhere() -> None:
    tty = _Tty()
    bar = Progress(4, tty, label="fetch", tty_interval_s=0.0)
    for _ in range(4):
        bar.step("x")
    bar.finish("done")
    out = tty.getvalue()
    assert out.count("\r") == 5
    assert out.endswith("\n")
    assert out.count("\n") == 1
    assert "fetch [##############################] 100.0% 4/4  done" in out
    log = io.StringIO()
    plain = Progress(2e6, log, label="model.gguf", unit="MB", scale=1e6)
    plain.update(1e6)  # no interval on a pipe: only the final line
    plain.update(2e6)
    plain.finish("written")
    assert log.getvalue() == (
        "model.gguf [##############################] 100.0% 2.0/2.0 MB  written\n"
    )
    quiet = Progress(3, None)
    quiet.step()
    quiet.finish()  # -q: nothing written, nothing raised


def test_percentiles_are_numpys_linear_percentiles() -> None:
    """One partial sort instead of ``np.percentile``: the same values (to the last bits of a
    double: the interpolation is numpy's, the index arithmetic may round differently)."""
    rng = np.random.default_rng(7)
    qs = (0, 1, 25, 50, 95, 99, 99.9, 100)
    for n in (1, 2, 3, 10, 99, 100, 101, 10_000):
        for _ in range(20):
            values = rng.gamma(2.0, 0.05, n)
            got = percentiles(values, qs)
            for q, want in zip(qs, np.percentile(values, qs), strict=True):
                assert got[f"p{q:g}"] == pytest.approx(float(want), rel=1e-12, abs=0)
