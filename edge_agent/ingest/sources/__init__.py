"""Where readings come from. Every source yields groups of items for the scoring loop.

========  =============================================================================
kind      ``source.path`` and behaviour
========  =============================================================================
jsonl     a file, FIFO or ``-`` (stdin); JSON lines (or frames) as for ``edge-agent score``
replay    a dataset file of JSON lines, replayed ``source.loops`` times (0 = forever) at
          ``source.rate_hz`` readings per second (0 = as fast as possible), optionally
          with Gaussian sensor noise (``source.noise`` x each channel's std) and a
          simulated offset/gain on one channel (``source.shift_*``)
udp       ``host:port`` to bind; one JSON line per datagram (sensor daemons push)
unix      a Unix datagram socket path to bind; one JSON line per datagram
mqtt      a topic on the broker at ``source.host:source.port``; one JSON line per message
========  =============================================================================

With ``source.format = "frames"`` the jsonl, udp, unix and mqtt kinds carry binary
frames instead of JSON lines (docs/frames.md): frames back to back in the stream,
one frame per datagram or message; the source decodes them itself.

With ``source.samples = true`` each line carries samples, not windows
(``{"values": [c floats]}`` or ``[[c floats], ...]``) and the stream is cut
into windows of the model's length every ``hop`` samples (manifest ``input``).

A group is what arrived together (up to ``model.max_batch`` items, waiting at
most ``source.max_wait_ms`` after the first); an empty group means "nothing
for a while" and lets the loop turn (watchdog, deadlines, signals). A source
that ends (file, replay) ends its iterator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from edge_agent.config import Settings
from edge_agent.errors import ConfigError
from edge_agent.ingest.frames import FrameDecoder
from edge_agent.ingest.readings import Item

#: How often an idle source yields an empty group so the main loop keeps turning.
IDLE_TICK_S = 0.25


class Source(Protocol):
    def groups(self) -> Iterator[list[Item]]:
        """Groups of items until the source ends (never, for sockets and topics)."""
        ...

    def close(self) -> None:
        """Release files and sockets."""


def open_source(settings: Settings, shape: tuple[int, ...], hop: int | None) -> Source:
    """The configured source, windowing sample streams when ``source.samples`` is set."""
    from edge_agent.ingest.sources import datagram, jsonl, mqtt, replay  # noqa: PLC0415 - one per kind, on demand
    from edge_agent.ingest.sources.window import Windowed  # noqa: PLC0415

    s = settings.source
    cap = settings.input.max_line_bytes
    batch = settings.model.max_batch
    frames = _frame_decoder(settings, shape)
    source: Source
    if s.kind == "jsonl":
        source = jsonl.JsonlSource(s.path, cap, frames)
    elif s.kind == "replay":
        source = replay.ReplaySource(
            s.path,
            cap,
            rate_hz=s.rate_hz,
            loops=s.loops,
            noise=s.noise,
            seed=s.seed,
            batch=batch,
            shift_channel=s.shift_channel,
            shift_offset=s.shift_offset,
            shift_gain=s.shift_gain,
            shift_after=s.shift_after,
        )
    elif s.kind in ("udp", "unix"):
        source = datagram.DatagramSource(
            s.kind,
            s.path,
            cap,
            batch,
            s.max_wait_ms / 1000.0,
            socket_mode=s.socket_mode,
            frames=frames,
        )
    elif s.kind == "mqtt":
        source = mqtt.MqttTopicSource(settings, cap, batch, frames)
    else:  # pragma: no cover - the config type admits only the kinds above
        raise ConfigError(f"source.kind {s.kind!r} is not known")
    if s.samples:
        return Windowed(source, shape, hop or shape[-1], cap)
    return source


def _frame_decoder(settings: Settings, shape: tuple[int, ...]) -> FrameDecoder | None:
    """The decoder of ``source.format = "frames"``, or None for JSON lines."""
    s = settings.source
    if s.format != "frames":
        return None
    if s.kind == "replay" or s.samples:
        raise ConfigError(
            'source.format = "frames" works with kind jsonl, udp, unix and mqtt and whole'
            f" windows (samples = false), not kind {s.kind!r} with samples = {s.samples}"
        )
    return FrameDecoder(shape, settings.input.max_frame_bytes)
