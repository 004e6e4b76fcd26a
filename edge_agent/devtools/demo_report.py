"""What ``edge-agent demo`` prints: the policies side by side, and the risk-coverage plot.

The plot is a small SVG written here (no plotting library needed): the error rate of the
local answers against the share of readings answered locally, as the confidence threshold
sweeps from "answer nothing locally" to "answer everything locally", with each policy's own
operating point marked. Every figure comes from the run's summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Coverage steps of the risk-coverage curve.
_STEPS = 40


def risk_coverage(points: list[tuple[float, bool]]) -> list[list[float]]:
    """[coverage, risk] pairs: the most confident share ``coverage`` of the readings answered
    locally, and the share of those local answers that were wrong."""
    ranked = sorted(points, key=lambda p: -p[0])
    n = len(ranked)
    out: list[list[float]] = []
    wrong = 0
    marks = {max(1, round(n * i / _STEPS)) for i in range(1, _STEPS + 1)} if n else set()
    for k, (_, ok) in enumerate(ranked, start=1):
        wrong += not ok
        if k in marks:
            out.append([round(k / n, 4), round(wrong / k, 5)])
    return out


def _pct(x: float | None, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%" if x is not None else "-"


def _row(name: str, cells: list[str], width: int = 30) -> str:
    return f"  {name:<24}" + "".join(f"{c:<{width}}" for c in cells).rstrip()


def _rtt(rtt: dict[str, Any], where: str) -> str:
    """``p50/p99 ms (n N, profile)`` of the urgent verdicts' round trips."""
    pair = "/".join(f"{rtt[q]:.1f}" if rtt[q] is not None else "-" for q in ("p50", "p99"))
    return f"{pair} ms (n {rtt['n']}, {where})"


def _network_note(net: dict[str, Any]) -> list[str]:
    if net["profile"] == "loopback":
        return []
    return [
        f"  network between device and broker: {net['profile']} ({net['describe']},"
        " through the demo's delay proxy; the cloud worker sits next to the broker)"
    ]


def render(summary: dict[str, Any]) -> str:
    """The summary as a few lines a newcomer can read."""
    s = summary
    runs = list(s["policies"].values())
    lines = [
        "",
        f"edge-agent demo — {s['models']['edge']} on the device, {s['models']['cloud']}"
        f" in the cloud, sensor noise {s['noise']} x channel std,"
        f" {s['readings']} readings in {s['elapsed_s']} s",
    ]
    net = s.get("network") or {"profile": "loopback"}
    lines += _network_note(net)
    for r in runs:
        w = r["warmup"]
        if w["readings"]:
            lines.append(
                f"  warm-up ({r['policy']}): {w['readings']} readings of {Path(w['data']).name}"
                f" (noise seed {w['seed']}) before the measured ones: {w['escalated']} escalated"
                f" (${w['cost_usd']:,.2f} once), {w['verdict_wait_s']} s waiting for verdicts"
            )
    lines.append(_row("", [f"{r['policy']} policy" for r in runs]))

    def each(name: str, f: Any) -> None:
        lines.append(_row(name, [f(r) for r in runs]))

    each("answered locally", lambda r: f"{r['local']} ({_pct(r['share_local'])})")
    each(
        "escalated",
        lambda r: f"{r['escalated']} (urgent {r['urgent']}, batch {r['batch']})",
    )
    each("  of which audits", lambda r: str(r["audit"]))
    each("alerts (not escalated)", lambda r: str(r["alerts"]))
    for key, name in (
        ("edge_only", "accuracy edge only"),
        ("hybrid", "accuracy hybrid"),
        ("hybrid_any_verdict", "  (every verdict wins)"),
        ("cloud_only", "accuracy cloud only"),
    ):
        each(name, lambda r, k=key: _pct(r["accuracy"][k], 2))
    each(
        "local latency p50/p99",
        lambda r: (
            "/".join(
                f"{r['local_latency_ms'][q]:.2f}" if r["local_latency_ms"][q] is not None else "-"
                for q in ("p50", "p99")
            )
            + " ms"
        ),
    )
    if all("cloud_round_trip_ms" in r for r in runs):
        each("cloud RTT p50/p99", lambda r: _rtt(r["cloud_round_trip_ms"], net["profile"]))
    cost = runs[0]["monthly_cost_usd"]
    each("hybrid cost per month", lambda r: f"${r['monthly_cost_usd']['hybrid']:,.2f}")
    lines.append(
        f"  (at {cost['readings_per_second']:g} reading/s; all-cloud sync"
        f" ${cost['all_cloud_sync']:,.2f}, all-cloud batch ${cost['all_cloud_batch']:,.2f})"
    )
    for r in runs:
        rt = r["routing"]
        if rt.get("policy") == "learned":
            lines.append(
                f"  learned: with probability >= {1 - rt['delta']:.0%}, at most"
                f" {_pct(rt['bound_local_corrections'], 2)} of local answers would be changed"
                f" by the cloud (alpha {_pct(rt['alpha'])}); strata escalated: "
                + (
                    ", ".join(
                        f"{k} ({v['plan']})"
                        for k, v in rt["strata"].items()
                        if v["plan"] != "local"
                    )
                    or "none"
                )
            )
    if s.get("plot"):
        lines.append(f"  risk-coverage plot: {s['plot']}")
    lines.append("")
    return "\n".join(lines)


def write_risk_coverage(path: Path, runs: dict[str, dict[str, Any]], noise: float) -> None:
    """An SVG of the local answers' error rate against coverage, policies marked."""
    w, h, m = 560, 360, 56
    curve = next(iter(runs.values()))["risk_coverage"]
    top = max([0.01, *(r for _, r in curve)] + [_local_risk(r) for r in runs.values()])
    top = min(1.0, top * 1.15)

    def xy(cov: float, risk: float) -> tuple[float, float]:
        x, y = m + cov * (w - 1.5 * m), h - m - risk / top * (h - 1.7 * m)
        return round(x, 1), round(y, 1)

    pts = " ".join("{:.1f},{:.1f}".format(*xy(c, r)) for c, r in curve)
    x0, y0 = xy(0, 0)
    x1, _ = xy(1, 0)
    _, yt = xy(0, top)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"'
        ' font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle">edge-agent demo, noise {noise}:'
        " risk vs coverage of the local answers</text>",
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{yt}" stroke="black"/>',
        f'<text x="{(x0 + x1) / 2}" y="{h - 14}" text-anchor="middle">'
        "coverage: share of readings answered locally</text>",
        f'<text x="14" y="{(y0 + yt) / 2}" text-anchor="middle"'
        f' transform="rotate(-90 14 {(y0 + yt) / 2})">risk: local answers wrong</text>',
        f'<text x="{x0 - 4}" y="{yt + 4}" text-anchor="end">{top:.1%}</text>',
        f'<text x="{x0 - 4}" y="{y0 + 4}" text-anchor="end">0%</text>',
        f'<text x="{x1}" y="{y0 + 16}" text-anchor="middle">100%</text>',
        f'<polyline points="{pts}" fill="none" stroke="#555" stroke-width="1.5"/>',
    ]
    colours = {"fixed": "#c0392b", "learned": "#1f6fb2"}
    for i, (name, r) in enumerate(runs.items()):
        cx, cy = xy(r["share_local"] or 0.0, _local_risk(r))
        colour = colours.get(name, "#333")
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{colour}"/>')
        parts.append(
            f'<text x="{x0 + 10}" y="{yt + 16 + 16 * i}" fill="{colour}">'
            f"● {name}: {r['escalated']} escalated, local answers"
            f" {_pct(_local_risk(r), 2)} wrong</text>"
        )
    parts.append("</svg>\n")
    path.write_text("\n".join(parts), encoding="utf-8")


def _local_risk(run: dict[str, Any]) -> float:
    acc = run["accuracy"].get("local_answers")
    return 1.0 - acc if acc is not None else 0.0
