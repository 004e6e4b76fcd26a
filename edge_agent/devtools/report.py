"""The benchmark's reports: a text table (stdout), Markdown (docs/BENCHMARKS.md) and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.devtools.network import network_lines


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _latency_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("pattern", "p50 ms", "p95 ms", "p99 ms", "per s", "CPU ms/rd")]
    for ref, p in results["packs"].items():
        named = []
        if "floor" in p:
            named += [
                (f"{ref} raw run (floor)", p["floor"]["single"]),
                (f"{ref} raw run x64", p["floor"]["batched"]),
            ]
        jf = p.get("json_floor")
        if jf:
            named += [(f"{ref} JSON parse alone: {k}", v) for k, v in jf["parse"].items()]
            named += [(f"{ref} JSON into the array: {k}", v) for k, v in jf["to_array"].items()]
            named += [(f"{ref} JSON into the array: {k}", v) for k, v in jf["validated"].items()]
            named += [
                (f"{ref} JSON floor: {jf['fastest_validated']} + raw run", jf["single"]),
                (f"{ref} JSON floor x64", jf["batched"]),
            ]
        if "naive" in p:
            named.append((f"{ref} naive integration", p["naive"]))
        if "process" in p:
            named.append((f"{ref} `score` process, from outside", p["process"]))
        a = p["agent"]
        named += [
            (f"{ref} edge-agent per JSON line", a["single"]),
            (f"{ref} edge-agent JSON lines x64", a["batched"]),
        ]
        if "frame" in a:
            named += [
                (f"{ref} edge-agent per frame", a["frame"]),
                (f"{ref} edge-agent frames x64", a["frames_batched"]),
            ]
        named += [
            (f"{ref} edge-agent from array", a["from_array"]),
            (f"{ref} edge-agent from array x64", a["from_array_batched"]),
        ]
        for name, s in named:
            per = s.get("throughput_per_s")
            rows.append(
                (
                    name,
                    _f(s.get("p50_ms")),
                    _f(s.get("p95_ms")),
                    _f(s.get("p99_ms")),
                    _f(per, 0) if per else "-",
                    _f(s.get("cpu_ms_per_reading"), 4),
                )
            )
    c = results["all_cloud"]
    rows.append(
        (
            "all-cloud sync (mosquitto + cloud worker)",
            _f(c["sync"].get("p50_ms")),
            _f(c["sync"].get("p95_ms")),
            _f(c["sync"].get("p99_ms")),
            _f(c["sync"].get("throughput_per_s"), 0),
            _f(c["sync"].get("cpu_ms_per_reading"), 4),
        )
    )
    rows.append(("all-cloud batch tier", "-", "-", "-", _f(c["batch"]["cases_per_s"], 0), "-"))
    return rows


def _cost_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for hname, cost in results["cost"].items():
        for name, s in cost["scenarios"].items():
            price = s["price_sync_per_1k_tokens"]
            lines.append(
                f"  {hname:<10} {name:<8} {'tokens' if price == 'measured' else f'${price}/1K'}:"
                f" all-cloud sync ${s['all_cloud_sync']:,.0f},"
                f" batch ${s['all_cloud_batch']:,.0f}, hybrid ${s['hybrid']:,.0f}"
            )
        m = cost.get("measured")
        if m is not None:
            lines.append(
                f"  {hname:<10} measured: {m['requests']} endpoint requests in {m['ledger']},"
                f" {m['mean_prompt_tokens']:.1f} prompt + {m['mean_completion_tokens']:.1f}"
                f" completion tokens each (${m['price_prompt_per_1k']}/1K prompt,"
                f" ${m['price_completion_per_1k']}/1K completion, batch x"
                f"{m['batch_price_factor']})"
            )
    return lines


def _routing_lines(results: dict[str, Any]) -> list[str]:
    """Fixed threshold vs learned policy on the demo's readings, per noise level."""
    routing = results.get("routing")
    if not routing:
        return []
    lines = [
        "",
        "routing on the demo's readings (400 per level; the learned policy after a warm-up of"
        " 1200 train readings):",
        "  noise  policy   escalated  accuracy edge / hybrid / cloud   cost per month",
    ]
    for summary in routing.values():
        for name, r in summary["policies"].items():
            a = r["accuracy"]
            lines.append(
                f"  {summary['noise']:<5g}  {name:<7}  {r['escalated']:>4}"
                f" ({100 * r['escalated'] / max(1, r['readings']):4.1f}%)"
                f"  {100 * a['edge_only']:6.2f} / {100 * a['hybrid']:6.2f} /"
                f" {100 * a['cloud_only']:6.2f}       ${r['monthly_cost_usd']['hybrid']:>10,.2f}"
            )
    lines.append("")
    return lines


def table(results: dict[str, Any]) -> str:
    rows = _latency_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    for h in results["hybrid"].values():
        lines.append(
            f"hybrid, test data with noise {h['noise']:g} x std: escalation"
            f" {100 * h['escalation_rate']:.1f}% (urgent {100 * h['urgent_rate']:.1f}%,"
            f" batch {100 * h['batch_rate']:.1f}%), agreement {_f(h['agreement'])},"
            f" device round trip p50 {_f(h['round_trip_ms_p50'])} / p99"
            f" {_f(h['round_trip_ms_p99'])} ms"
        )
    lines += network_lines(results)
    lines += _routing_lines(results)
    lines += [
        f"telemetry on/off p99: {_f(results['telemetry']['p99_ratio'])}x"
        f" (p99.9: {_f(results['telemetry'].get('p999_ratio'))}x);"
        f" cold start READY=1 {_f(results['cold_start']['ready_s'])} s, first decision"
        f" {_f(results['cold_start']['first_decision_s'])} s; agent peak RSS"
        f" {results['process']['peak_rss_bytes'] / 2**20:.1f} MiB",
        "",
        "monthly cost per device at "
        f"{results['options']['readings_per_second']:g} reading/s"
        f" ({results['options']['tokens_per_reading']} tokens/reading):",
    ]
    lines += _cost_lines(results)
    lines += ["", "budgets:"]
    for b in results["budgets"]:
        pooled = "" if b.get("pooled") is None else f"; pooled {_f(b['pooled'])}"
        lines.append(
            f"  {'PASS' if b['pass'] else 'FAIL'}  {b['budget']}:"
            f" {_f(b['value'])} {b['unit']} (limit {b['limit']}{pooled})"
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any], command: str) -> str:
    m = results["machine"]
    out = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {m['cpu']}"
        f" ({m['cores']} cores, {m['machine']}, {m['system']}),"
        f" versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.",
        "Every figure below comes from that one run; ratios compare figures of the same run.",
        "",
        "```",
        table(results).rstrip(),
        "```",
        "",
    ]
    return "\n".join(out)


#: In a Markdown report, what follows this line is the reader's notes: kept when the tables
#: above it are written again (``write_markdown``).
NOTES_MARKER = "<!-- notes: kept when `edge-agent bench --markdown` writes this file again -->"


def write_markdown(path: Path, results: dict[str, Any], command: str) -> None:
    """``markdown`` into ``path``, keeping the notes an earlier file had after the marker."""
    notes = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if NOTES_MARKER in old:
            notes = "\n" + NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]
    path.write_text(markdown(results, command) + notes, encoding="utf-8")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names, p50, p99 = [], [], []
    for ref, p in results["packs"].items():
        for label, s in (
            ("floor", p.get("floor", {}).get("single")),
            ("naive", p.get("naive")),
            ("agent JSON", p["agent"]["single"]),
            ("agent frame", p["agent"].get("frame")),
        ):
            if s:
                names.append(f"{ref}\n{label}")
                p50.append(s["p50_ms"])
                p99.append(s["p99_ms"])
    c = results["all_cloud"]["sync"]
    names.append("all-cloud\nsync")
    p50.append(c["p50_ms"])
    p99.append(c["p99_ms"])
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.2), 4))
    idx = np.arange(len(names))
    ax.bar(idx - 0.2, p50, 0.4, label="p50")
    ax.bar(idx + 0.2, p99, 0.4, label="p99")
    ax.set_yscale("log")
    ax.set_ylabel("ms per reading (log)")
    ax.set_xticks(idx, names, fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
