"""One progress line on a stream (stderr): redrawn in place on a terminal, plain lines else.

Used by every command that shows progress (models fetch, models push, bench, demo), so they
look and behave alike: ``-q`` passes ``stream=None`` and nothing is written.
"""

from __future__ import annotations

import time
from typing import IO

WIDTH = 30


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``label [#####.....]  42%  done/total unit  note``.

    On a terminal the line is redrawn at most every ``tty_interval_s``; elsewhere (a log, a
    pipe) a plain line is written at most every ``plain_interval_s`` (None: only at the end).
    ``scale`` divides the numbers shown (1e6 with ``unit="MB"`` for bytes); ``counts=False``
    shows the percentage alone.
    """

    def __init__(
        self,
        total: float,
        stream: IO[str] | None,
        *,
        label: str = "",
        unit: str = "",
        scale: float = 1.0,
        tty_interval_s: float = 0.1,
        plain_interval_s: float | None = None,
        counts: bool = True,
    ) -> None:
        self.total = max(total, 1e-12)
        self.stream = stream
        self.label = label
        self.unit = unit
        self.scale = scale
        self.counts = counts
        self.tty = stream is not None and is_terminal(stream)
        self.interval_s = tty_interval_s if self.tty else plain_interval_s
        self.done = 0.0
        self._last = float("-inf")

    def update(self, done: float, note: str = "") -> None:
        """Progress is now ``done`` (of ``total``); drawn when the interval has passed."""
        self.done = done
        if self.stream is None or self.interval_s is None:
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        self._write(note, final=False)

    def step(self, note: str = "") -> None:
        """One more unit done."""
        self.update(self.done + 1, note)

    def finish(self, note: str = "") -> None:
        """The last line, always written (ends the redrawn line on a terminal)."""
        if self.stream is not None:
            self._write(note, final=True)

    def line(self, note: str) -> str:
        frac = min(max(self.done / self.total, 0.0), 1.0)
        filled = int(frac * WIDTH)
        bar = "#" * filled + "." * (WIDTH - filled)
        text = f"[{bar}] {frac * 100:5.1f}%"
        if self.counts and self.scale == 1.0:
            text += f" {self.done:g}/{self.total:g}"
        elif self.counts:
            text += f" {self.done / self.scale:.1f}/{self.total / self.scale:.1f}"
        text = f"{self.label} {text}" if self.label else text
        text = f"{text} {self.unit}" if self.unit else text
        return f"{text}  {note}" if note else text

    def _write(self, note: str, *, final: bool) -> None:
        if self.stream is None:
            return
        text = self.line(note)
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
