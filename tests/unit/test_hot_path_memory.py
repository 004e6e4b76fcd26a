"""The scoring hot path allocates nothing per reading that it can reuse (issue 17).

tracemalloc sees Python's allocations and numpy's array data. Two promises:

* a micro-batch is scored from the scorer's reused input buffer (or, for frames decoded
  together, from their block), not from a freshly stacked copy: the peak traced while
  scoring 64 readings stays below the size of one [64, 6, 100] float32 input (153,600
  bytes), which a fresh ``np.stack`` would allocate every time;
* steady-state scoring through the agent (decode, score, route, drift and latency windows)
  does not grow: after a warm-up, 4,000 more readings leave less than 64 KiB more traced
  memory in the package's own code (the windows are fixed-size rings).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import load_settings
from edge_agent.devtools.measure import frames_of, load_lines, windows_of
from edge_agent.ingest.frames import FrameDecoder
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import BUNDLED_TEST_DATA, resolve
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent

BLOCK_BYTES = 64 * 6 * 100 * 4


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _peak_while(fn: object) -> int:
    """Traced bytes allocated at the peak of ``fn()`` beyond what was held before it."""
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    fn()  # type: ignore[operator]
    _, peak = tracemalloc.get_traced_memory()
    return peak - before


def test_a_micro_batch_is_scored_from_the_reused_buffer(traced: None) -> None:
    scorer = Scorer.open(resolve("basicmotions-int8"))
    x = windows_of(load_lines(BUNDLED_TEST_DATA))
    readings = [Reading(values=x[i % len(x)].copy()) for i in range(64)]
    scorer.score(readings)  # the buffer is made once, at the first batch this size
    buffer = scorer._buffer
    peaks = [_peak_while(lambda: scorer.score(readings)) for _ in range(20)]
    assert scorer._buffer is buffer
    assert max(peaks) < BLOCK_BYTES, peaks
    # Frames decoded together: the block is the input, no copy either.
    decoder = FrameDecoder(scorer.shape)
    frames = (frames_of(load_lines(BUNDLED_TEST_DATA)) * 2)[:64]
    decoded = decoder.decode_many(frames)
    assert all(isinstance(r, Reading) for r in decoded)
    block_peaks = [_peak_while(lambda: scorer.score(decoded)) for _ in range(20)]  # type: ignore[arg-type]
    assert max(block_peaks) < BLOCK_BYTES, block_peaks


def _package_bytes(snapshot: tracemalloc.Snapshot) -> int:
    package = str(Path(__file__).resolve().parents[2] / "edge_agent")
    stats = snapshot.filter_traces([tracemalloc.Filter(True, f"{package}/*")]).statistics(
        "filename"
    )
    return sum(s.size for s in stats)


def test_steady_state_scoring_through_the_agent_does_not_grow(traced: None, tmp_path: Path) -> None:
    settings = load_settings(
        None,
        env={
            "EDGE_AGENT_DEVICE_ID": "mem",
            "EDGE_AGENT_DEVICE_STATE_DIR": str(tmp_path / "state"),
            "EDGE_AGENT_TELEMETRY_PUBLISH": "false",
        },
    )
    agent = Agent(settings, Scorer.open(resolve("basicmotions-int8")))
    lines = load_lines(BUNDLED_TEST_DATA)
    frames = frames_of(lines)
    decoder = FrameDecoder(agent.scorer.shape)
    try:

        def run(n: int) -> None:
            for i in range(n):
                agent.pipeline.process([lines[i % len(lines)]])
                agent.pipeline.process([decoder.decode(frames[i % len(frames)])])
                if i % 50 == 0:
                    agent.pipeline.process(decoder.decode_many(frames))

        run(1000)  # warm-up: windows filled, caches made
        first = _package_bytes(tracemalloc.take_snapshot())
        run(2000)
        grown = _package_bytes(tracemalloc.take_snapshot()) - first
        assert agent.counters["readings"] >= 6000
        assert grown < 64 * 1024, grown
    finally:
        agent.close()
