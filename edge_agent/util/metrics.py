"""Prometheus text exposition (format 0.0.4) without a registry.

Each exporter (the agent, the cloud worker) renders its own state into an ``Exposition`` at
scrape or tick time: one ``# HELP`` and one ``# TYPE`` line per family, its samples together,
label values escaped. Nothing here is global: a process may hold any number of exporters
(the tests run several in one process). ``Histogram`` keeps cumulative-bucket counts of
observations in seconds for one writer thread; readers take a consistent-enough copy.
``MetricsServer`` serves one exporter's text on a loopback port.

Naming rules the exporters follow (promtool checks them): counters end in ``_total``,
units are base units spelled out (``_seconds``, ``_bytes``, ``_ratio``), and what varies
(a reason, a tier, a device) is a label, never part of a metric name.
"""

from __future__ import annotations

import bisect
import http.server
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram", "untyped"]
Labels = Mapping[str, str]
#: Content type of the text format served on ``/metrics``.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label_text(labels: Labels | None) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def number(value: Any) -> float | None:
    """``value`` as a finite number, or None (for None, strings, NaN: nothing is exported)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


@dataclass(frozen=True)
class HistogramData:
    """A histogram at one moment: upper bounds, cumulative counts (one more: +Inf), sum."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class Histogram:
    """Counts of observations (seconds) per bucket, for one writer thread.

    ``observe`` is a bisection over the bounds and two additions. ``data`` may run on another
    thread: it copies the counts first and derives the total count from that copy, so
    buckets and ``_count`` always agree; ``_sum`` may miss an observation made meanwhile.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        b = tuple(float(x) for x in bounds)
        if not b or any(not math.isfinite(x) for x in b) or list(b) != sorted(set(b)):
            raise ValueError("histogram bounds must be finite and strictly increasing")
        self.bounds = b
        self._counts = [0] * (len(b) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def observe_many(self, values: Sequence[float], scale: float = 1.0) -> None:
        """``observe(v * scale)`` for each value (a scored group's latencies, ms to s)."""
        counts, bounds, total = self._counts, self.bounds, 0.0
        for value in values:
            v = value * scale
            counts[bisect.bisect_left(bounds, v)] += 1
            total += v
        self._sum += total

    def data(self) -> HistogramData:
        counts = list(self._counts)
        total = self._sum
        cumulative: list[int] = []
        running = 0
        for c in counts:
            running += c
            cumulative.append(running)
        return HistogramData(self.bounds, tuple(cumulative), total)


class Exposition:
    """Builds one exposition: families in the order they are added, each written whole."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def _family(self, name: str, kind: Kind, help_text: str) -> None:
        if name in self._names:
            raise ValueError(f"metric family {name} written twice")
        self._names.add(name)
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def _sample(self, name: str, labels: Labels | None, value: float) -> None:
        self._lines.append(f"{name}{_label_text(labels)} {_format_value(value)}")

    def add(
        self,
        name: str,
        kind: Literal["counter", "gauge"],
        help_text: str,
        samples: Iterable[tuple[Labels | None, Any]],
    ) -> None:
        """A counter or gauge family; samples whose value is not a finite number are left
        out, and a family left without samples is not written at all."""
        kept = [
            (labels, v) for labels, v in ((lb, number(x)) for lb, x in samples) if v is not None
        ]
        if not kept:
            return
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self._family(name, kind, help_text)
        for labels, value in kept:
            self._sample(name, labels, value)

    def gauge(self, name: str, help_text: str, value: Any, labels: Labels | None = None) -> None:
        self.add(name, "gauge", help_text, [(labels, value)])

    def counter(self, name: str, help_text: str, value: Any, labels: Labels | None = None) -> None:
        self.add(name, "counter", help_text, [(labels, value)])

    def labelled(
        self,
        name: str,
        kind: Literal["counter", "gauge"],
        help_text: str,
        label: str,
        values: Mapping[str, Any],
    ) -> None:
        """One series per entry of ``values``, the key as the value of ``label``."""
        self.add(name, kind, help_text, [({label: str(k)}, v) for k, v in sorted(values.items())])

    def histogram(
        self,
        name: str,
        help_text: str,
        series: Iterable[tuple[Labels | None, HistogramData]],
    ) -> None:
        """A histogram family (``_bucket`` with ``le``, ``_sum``, ``_count`` per series)."""
        rows = list(series)
        if not rows:
            return
        self._family(name, "histogram", help_text)
        for labels, h in rows:
            base = dict(labels or {})
            for bound, count in zip((*h.bounds, math.inf), h.cumulative, strict=True):
                self._sample(f"{name}_bucket", {**base, "le": _format_value(bound)}, count)
            self._sample(f"{name}_sum", base, h.sum)
            self._sample(f"{name}_count", base, h.count)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


class MetricsServer:
    """A loopback-only ``/metrics`` endpoint serving what ``text`` returns at each scrape."""

    def __init__(self, port: int, text: Callable[[], str], name: str = "edge-agent") -> None:
        get_text = text

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = get_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
                log.debug("metrics request: %s", format % args)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name=f"{name}-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
