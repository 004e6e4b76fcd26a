"""The fleet commands of ``edge-agent``: ``fleet-sim`` (docs/fleet.md) and ``fleet-bridge``.
Their modules are imported when a command runs, not when the CLI starts."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from edge_agent.config import Settings
from edge_agent.errors import ConfigError
from edge_agent.models.pack import BUNDLED_TEST_DATA

EXIT_OK, EXIT_FAILURE = 0, 1


def cmd_fleet_sim(args: argparse.Namespace) -> int:
    from edge_agent.devtools import fleet, fleetrun  # noqa: PLC0415 - a tool, not the service

    if args.devices < 1 or args.workers < 1 or args.duration <= 0:
        raise ConfigError("fleet-sim: --devices, --workers and --duration must be positive")
    if args.case_rate < 0 or not 0.0 <= args.batch_share <= 1.0 or args.resend <= 0:
        raise ConfigError("fleet-sim: --case-rate >= 0, --batch-share within [0, 1], --resend > 0")
    opts = fleet.FleetOptions(
        devices=args.devices,
        duration_s=args.duration,
        case_rate=args.case_rate,
        seed=args.seed,
        batch_share=args.batch_share,
        resend_s=args.resend,
        drain_s=args.drain,
        windows=fleetrun.load_windows(Path(args.data)),
    )
    faults = fleetrun.Faults(args.kill_worker_at, args.restart_broker_at, args.broker_down)
    report = fleetrun.run_fleet(opts, args.workers, faults, progress=not args.quiet)
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")
    return EXIT_OK if report["charged_once"] else EXIT_FAILURE


def cmd_fleet_bridge(args: argparse.Namespace) -> int:
    from edge_agent.devtools.bridge import site_bridge_conf  # noqa: PLC0415 - a tool

    prefix = args.prefix or args.read_settings(args).mqtt.topic_prefix
    conf = site_bridge_conf(
        args.site,
        args.upstream,
        prefix,
        cafile=args.cafile,
        certfile=args.certfile,
        keyfile=args.keyfile,
    )
    sys.stdout.write(conf)
    return EXIT_OK


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    settings: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add ``fleet-sim`` and ``fleet-bridge``; ``settings`` reads the config of a command."""
    fsim = sub.add_parser(
        "fleet-sim", help="simulated devices against real cloud workers (docs/fleet.md)"
    )
    fsim.add_argument("--devices", type=int, default=1000)
    fsim.add_argument("--duration", type=float, default=120.0, help="seconds of new cases")
    fsim.add_argument("--workers", type=int, default=2, help="edge-agent cloud processes")
    fsim.add_argument("--case-rate", type=float, default=0.1, help="hard cases/s per device")
    fsim.add_argument("--kill-worker-at", type=float, default=None, metavar="S")
    fsim.add_argument("--restart-broker-at", type=float, default=None, metavar="S")
    fsim.add_argument("--broker-down", type=float, default=0.0, help="s the broker stays down")
    fsim.add_argument("--batch-share", type=float, default=0.5, help="cases sent in batches")
    fsim.add_argument("--resend", type=float, default=15.0, help="s before a case is re-sent")
    fsim.add_argument("--drain", type=float, default=30.0, help="s to wait for late verdicts")
    fsim.add_argument("--seed", type=int, default=1)
    fsim.add_argument("--data", default=str(BUNDLED_TEST_DATA), help="JSON lines of real windows")
    fsim.add_argument("--json", default="", help="also write the report to this file")
    fsim.add_argument("--quiet", action="store_true", help="no progress line")
    fsim.set_defaults(func=cmd_fleet_sim)
    fbridge = sub.add_parser(
        "fleet-bridge", help="mosquitto.conf lines bridging a site's broker upstream"
    )
    fbridge.add_argument("--site", required=True, help="the site's name (in client ids)")
    fbridge.add_argument("--upstream", required=True, metavar="HOST:PORT")
    fbridge.add_argument("--prefix", default="", help="topic prefix (default mqtt.topic_prefix)")
    fbridge.add_argument("--cafile", default="")
    fbridge.add_argument("--certfile", default="")
    fbridge.add_argument("--keyfile", default="")
    fbridge.set_defaults(func=cmd_fleet_bridge, read_settings=settings)
