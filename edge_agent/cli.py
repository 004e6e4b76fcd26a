"""The ``edge-agent`` command.

Subcommands::

    edge-agent run [--exit-when-drained]       the device service (config: source, mqtt, ...)
    edge-agent cloud [--ledger-summary [PATH]] the cloud fallback worker (or its ledger)
    edge-agent fleet-sim [--devices N]         simulated devices against real cloud workers
    edge-agent fleet-bridge --site S --upstream H:P   a site broker's bridge configuration
    edge-agent demo [--json]                   broker + cloud worker + agent on real data
    edge-agent score [FILE|-] [--format frames]  JSON lines (or frames) in, decisions out
    edge-agent models list [--json]            installed model packs
    edge-agent models verify [PACK ...]        check every file's size and sha256
    edge-agent models fetch PACK [PACK ...]    put a pack's large file into the model store
    edge-agent models keygen --out DIR         an Ed25519 key pair for signing releases
    edge-agent models sign PACK --key FILE     sign a pack as a release (release.json/.sig)
    edge-agent models push PACK --device ID    send a signed release to a device over MQTT

Logging is configured here and only here; under systemd stderr goes to the
journal. Exit codes: 0 success, 1 a model or runtime failure, 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent import __version__
from edge_agent.config import Settings, load_settings
from edge_agent.devtools import fleetcli
from edge_agent.errors import ConfigError, EdgeAgentError, FetchError, ModelError
from edge_agent.ingest.frames import FrameDecoder
from edge_agent.ingest.sources import open_source
from edge_agent.ingest.sources.jsonl import fd_groups
from edge_agent.models.pack import BUNDLED_TEST_DATA, ModelPack, discover, resolve
from edge_agent.scoring.backends.base import BackendOptions
from edge_agent.scoring.pipeline import ScorePipeline
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent, stdout_writer

log = logging.getLogger("edge_agent")


EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or os.environ.get("EDGE_AGENT_CONFIG") or None
    return load_settings(path)


def _open_scorer(settings: Settings, pack_ref: str | None) -> Scorer:
    pack = resolve(
        pack_ref or settings.model.pack, settings.model.packs_dir, settings.model.store_dir
    )
    return Scorer.open(pack, BackendOptions.of(settings.model))


def cmd_score(args: argparse.Namespace) -> int:
    settings = _settings(args)
    scorer = _open_scorer(settings, args.model)
    max_batch = args.batch or settings.model.max_batch
    pipeline = ScorePipeline(scorer, settings.input.max_line_bytes, max_batch)
    frames = (
        FrameDecoder(scorer.shape, settings.input.max_frame_bytes) if args.fmt == "frames" else None
    )
    if args.example:
        args.file = str(BUNDLED_TEST_DATA)
    if args.file == "-":
        fd, close = sys.stdin.fileno(), False
    else:
        try:
            fd, close = os.open(args.file, os.O_RDONLY), True
        except OSError as exc:
            raise ConfigError(f"{args.file}: cannot open input: {exc.strerror}") from exc
    out = sys.stdout.buffer
    try:
        for group in fd_groups(fd, settings.input.max_line_bytes, frames):
            out.write(pipeline.process(group))
            out.flush()
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly like other Unix filters.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        if close:
            os.close(fd)
        scorer.close()
    if not args.quiet:
        sys.stderr.write(pipeline.summary() + "\n")
    return EXIT_OK


def _open_live_scorer(settings: Settings) -> Scorer:
    """What the device serves: the installed release its pointer names (verified), else the
    configured pack."""
    from edge_agent.models.store import ModelStore  # noqa: PLC0415 - the device service only

    if settings.rollout.enabled:
        pack, _ = ModelStore(settings.device.state_dir, settings.model.store_dir).live_pack()
        if pack is not None:
            log.info("serving the installed release %s (%s)", pack.ref, pack.path)
            return Scorer.open(pack, BackendOptions.of(settings.model))
    return _open_scorer(settings, None)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    scorer = _open_live_scorer(settings)
    spec = scorer.pack.manifest.input
    try:
        source = open_source(settings, tuple(spec.shape), spec.hop)
    except EdgeAgentError:
        scorer.close()
        raise
    agent = Agent(settings, scorer, emit=stdout_writer if args.decisions else None)
    try:
        code = agent.run(
            source, exit_when_drained=args.exit_when_drained, drain_timeout_s=args.drain_timeout
        )
    finally:
        scorer.close()
    summary = agent.summary()
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    sys.stderr.write(f"edge-agent run: {agent.status_line()}\n")
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.devtools.demo import render, run_demo  # noqa: PLC0415 - the service never needs the demo

    path = args.config or os.environ.get("EDGE_AGENT_CONFIG") or None
    base = load_settings(path) if path else None
    summary = run_demo(args, base)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write(render(summary))
    return EXIT_OK if summary["drained"] else EXIT_FAILURE


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.devtools import bench  # noqa: PLC0415 - the service never needs the benchmark

    prices = {
        "price_sync_per_1k_tokens": args.price_sync,
        "price_sync_low": args.price_sync_low,
        "price_sync_high": args.price_sync_high,
        "batch_discount": args.batch_discount,
        "tokens_per_reading": args.tokens_per_reading,
    }
    opts = bench.BenchOptions(
        quick=args.quick,
        repeats=args.repeats,
        packs=args.packs or [],
        data=Path(args.data),
        readings_per_second=args.readings_per_second,
        progress=not args.quiet,
        ledger=Path(args.ledger) if args.ledger else None,
        endpoint_latency=Path(args.endpoint_latency) if args.endpoint_latency else None,
        **({"network": args.network} if args.network else {}),
        **{k: v for k, v in prices.items() if v is not None},
    )
    results = bench.run_bench(opts)
    command = (
        "edge-agent bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "edge-agent bench"
    )
    sys.stdout.write(bench.table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        bench.write_markdown(Path(args.markdown), results, command.strip())
    if args.plot:
        for svg in bench.plot_routing(results, Path(args.plot)):
            sys.stderr.write(f"risk-coverage plot: {svg}\n")
        try:
            bench.plot(results, Path(args.plot))
        except ImportError:
            sys.stderr.write(
                f"bench: {args.plot} not written: the latency plot needs matplotlib"
                " (pip install matplotlib); the figures are in the table above\n"
            )
            return EXIT_FAILURE
    return EXIT_OK


def cmd_cloud(args: argparse.Namespace) -> int:
    from edge_agent.cloud.service import main_cloud  # noqa: PLC0415 - the device never needs the cloud worker

    settings = _settings(args)
    if args.ledger_summary is not None:
        from edge_agent.cloud.ledger_store import summary_of  # noqa: PLC0415

        path = args.ledger_summary or settings.cloud.ledger_path
        if not path:
            raise ConfigError("--ledger-summary: give a path or set cloud.ledger_path")
        sys.stdout.write(json.dumps(summary_of(path), indent=1, sort_keys=True) + "\n")
        return EXIT_OK
    return main_cloud(settings)


def cmd_models_list(args: argparse.Namespace) -> int:
    from edge_agent.models.store import ModelStore  # noqa: PLC0415 - the device's state

    settings = _settings(args)
    packs = discover(settings.model.packs_dir, settings.model.store_dir)
    store = ModelStore(settings.device.state_dir, settings.model.store_dir)
    installed = store.installed()
    live = store.read_pointer().live if installed else None
    if args.json:
        rows = [p.summary() for p in packs]
        rows += [{**p.summary(), "installed": True, "live": f == live} for f, p in installed]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    if not packs and not installed:
        sys.stdout.write("no model packs found\n")
        return EXIT_OK
    for p in packs:
        m = p.manifest
        mark = "*" if m.default else " "
        sys.stdout.write(f"{mark} {p.ref:<28} {m.backend:<10} {p.path.resolve()}\n")
    if installed:
        sys.stdout.write(f"installed releases ({store.packs}; > serves):\n")
    for folder, p in installed:
        mark = ">" if folder == live else " "
        sys.stdout.write(f"{mark} {p.ref:<28} {p.manifest.backend:<10} {p.path.resolve()}\n")
    return EXIT_OK


def cmd_models_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    packs: list[ModelPack] = (
        [resolve(ref, settings.model.packs_dir, settings.model.store_dir) for ref in args.packs]
        if args.packs
        else discover(settings.model.packs_dir, settings.model.store_dir)
    )
    from edge_agent.models.release import load_public_key, verify_release  # noqa: PLC0415

    keys = [(Path(k).name, load_public_key(Path(k))) for k in args.pubkey or []]
    failed = 0
    for pack in packs:
        try:
            pack.verify()
            if keys:
                verify_release(pack.path, keys, max_file_bytes=settings.rollout.max_file_bytes)
        except ModelError as exc:
            failed += 1
            sys.stdout.write(f"FAIL {pack.ref}: {exc}\n")
        else:
            signed = ", signature ok" if keys else ""
            sys.stdout.write(f"ok   {pack.ref} ({len(pack.manifest.files)} files{signed})\n")
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_models_keygen(args: argparse.Namespace) -> int:
    from edge_agent.models.release import keygen  # noqa: PLC0415

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keygen(out / f"{args.name}.key", out / f"{args.name}.pub")
    sys.stdout.write(
        f"private key: {out / (args.name + '.key')} (keep it off the devices)\n"
        f"public key:  {out / (args.name + '.pub')} (copy it to each device's trusted keys)\n"
    )
    return EXIT_OK


def cmd_models_sign(args: argparse.Namespace) -> int:
    from edge_agent.models.release import load_private_key, sign_pack  # noqa: PLC0415

    rid = sign_pack(Path(args.pack), load_private_key(Path(args.key)), rollback=args.rollback)
    kind = "rollback release" if args.rollback else "release"
    sys.stdout.write(f"signed {kind} {rid} in {args.pack}\n")
    return EXIT_OK


def cmd_models_push(args: argparse.Namespace) -> int:
    from edge_agent.rollout.push import push_release  # noqa: PLC0415 - operator side only

    settings = _settings(args)
    event = push_release(
        settings,
        Path(args.pack),
        args.device,
        device_path=args.device_path,
        timeout_s=args.timeout,
        progress=None if args.quiet else sys.stderr,
    )
    sys.stdout.write(json.dumps(event) + "\n")
    return EXIT_OK if event.get("state") in ("promoted", "committed") else EXIT_FAILURE


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from edge_agent.models.fetch import Quantizer, fetch_pack  # noqa: PLC0415 - this command only

    quantizer: Quantizer
    try:  # llama.cpp's quantizer, for packs whose file is requantized at fetch (extra llm)
        from edge_agent.scoring.backends.llama_cpp import quantize_gguf  # noqa: PLC0415
    except (ImportError, OSError) as exc:  # not installed, or its shared library will not load
        why = str(exc)

        def quantizer(_src: Path, _dst: Path, _kind: str) -> None:
            raise FetchError(
                "this pack's model file is made by llama.cpp's quantizer, which needs the llm"
                f" extra: pip install 'edge-agent[llm]' ({why})"
            )
    else:
        quantizer = quantize_gguf
    settings = _settings(args)
    packs = [resolve(ref, settings.model.packs_dir, settings.model.store_dir) for ref in args.packs]
    for pack in packs:
        progress = None if args.quiet else sys.stderr
        result = fetch_pack(pack, progress=progress, quantizer=quantizer)
        pack.verify()
        if result is None:
            sys.stdout.write(f"ok   {pack.ref}: nothing to fetch (no store file)\n")
        else:
            how = "fetched" if result.fetched else "already in the store"
            sys.stdout.write(f"ok   {pack.ref}: {result.path} ({how}, verified)\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="On-device inference: score locally, send only hard cases to the cloud.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--config", help="TOML config file (default: $EDGE_AGENT_CONFIG)")
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: INFO for the services (run, cloud), WARNING for the rest",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _add_device_commands(sub)
    _add_operator_tools(sub)
    cloud = sub.add_parser("cloud", help="the cloud fallback worker (urgent + batch tiers)")
    cloud.set_defaults(func=cmd_cloud)
    cloud.add_argument(
        "--ledger-summary",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="print the cost ledger (PATH, default cloud.ledger_path) as JSON and exit",
    )

    fleetcli.add_commands(sub, _settings)

    msub = _add_models_commands(sub)
    # `--config` is accepted before or after the subcommand (`edge-agent run --config F`).
    subparsers = [*sub.choices.values(), *msub.choices.values()]
    for p in subparsers:
        p.add_argument(
            "--config",
            default=argparse.SUPPRESS,
            help="TOML config file (default: $EDGE_AGENT_CONFIG)",
        )
    return parser


def _add_device_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    score = sub.add_parser("score", help="score JSON lines (file or stdin), one decision per line")
    score.add_argument("file", nargs="?", default="-", help="input file, '-' for stdin")
    score.add_argument(
        "--example",
        action="store_true",
        help="score the BasicMotions test windows bundled with the package instead of FILE",
    )
    score.add_argument("--model", help="model pack name or folder (default: the default pack)")
    score.add_argument("--batch", type=int, help="largest internal batch (default model.max_batch)")
    fmt = score.add_argument("--format", choices=["jsonl", "frames"], default="jsonl", dest="fmt")
    fmt.help = "input: JSON lines, or binary frames back to back (docs/frames.md)"
    score.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    score.set_defaults(func=cmd_score)

    run = sub.add_parser("run", help="the device service: score, act, send hard cases")
    run.add_argument(
        "--exit-when-drained",
        action="store_true",
        help="stop once the source is exhausted and the outbox is empty",
    )
    run.add_argument(
        "--drain-timeout", type=float, default=30.0, help="longest wait for draining (s)"
    )
    run.add_argument(
        "--decisions",
        action="store_true",
        help="print every decision (and each stored hard case) as JSON lines on stdout",
    )
    run.add_argument("--summary-json", help="write the end-of-run summary to this file")
    run.set_defaults(func=cmd_run)


def _add_operator_tools(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo", help="the whole hybrid loop on this machine: broker, cloud worker, agent"
    )
    demo.add_argument("--loops", type=int, default=10, help="passes over the test windows")
    demo.add_argument("--rate-hz", type=float, default=200.0, help="readings per second")
    demo.add_argument("--noise", type=float, default=1.5, help="sensor noise, x channel std")
    demo.add_argument("--seed", type=int, default=0, help="noise seed")
    demo.add_argument(
        "--readings-per-second",
        type=float,
        default=1.0,
        help="one device's reading rate, for the monthly cost estimate",
    )
    demo.add_argument(
        "--data", default=str(BUNDLED_TEST_DATA), help="JSON lines with 'label' fields"
    )
    demo.add_argument(
        "--policy",
        choices=["both", "fixed", "learned"],
        default="both",
        help="routing policies to run, side by side (default: both)",
    )
    demo.add_argument(
        "--warmup-loops",
        type=int,
        default=30,
        help="passes over the warm-up windows the learned policy sees first (0: none)",
    )
    demo.add_argument(
        "--warmup-data",
        default=str(BUNDLED_TEST_DATA.parent / "train.jsonl"),
        help="windows of the warm-up (default: the bundled train split)",
    )
    demo.add_argument("--network", default="loopback", help="loopback|wired|lte|satellite")
    demo.add_argument("--plot", help="write a risk-coverage plot (SVG) to this file")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--keep", action="store_true", help="keep the temporary state folder")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    bench_p = sub.add_parser(
        "bench", help="latency, memory and cloud cost here, vs the raw runtime and all-cloud"
    )
    bench_p.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    bench_p.add_argument("--repeats", type=int, default=0, help="passes over the test windows")
    bench_p.add_argument("--packs", nargs="*", help="packs to measure (default: device packs)")
    bench_p.add_argument(
        "--data", default=str(BUNDLED_TEST_DATA), help="JSON lines of test windows"
    )
    bench_p.add_argument("--json", help="write every figure as JSON to this file")
    bench_p.add_argument("--markdown", help="write a Markdown report to this file")
    bench_p.add_argument(
        "--plot",
        help="write a PNG of latency per pattern (needs matplotlib) and, next to it,"
        " risk-coverage SVGs of the routing comparison",
    )
    # Prices default to the [cloud] section's defaults (docs/config.md).
    bench_p.add_argument("--price-sync", type=float, help="$ per 1K tokens, sync")
    bench_p.add_argument("--price-sync-low", type=float, help="low sync price")
    bench_p.add_argument("--price-sync-high", type=float, help="high sync price")
    bench_p.add_argument("--batch-discount", type=float, help="batch discount")
    bench_p.add_argument("--tokens-per-reading", type=int, help="tokens per call")
    bench_p.add_argument(
        "--readings-per-second", type=float, default=1.0, help="one device's reading rate"
    )
    bench_p.add_argument(
        "--ledger",
        help="a cloud worker's ledger file with endpoint requests: also price measured tokens",
    )
    bench_p.add_argument("--network", help="profiles, e.g. wired,lte (default: all; none)")
    bench_p.add_argument("--endpoint-latency", help="a scripts/endpoint_roundtrip.py --json")
    bench_p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bench_p.set_defaults(func=cmd_bench)


def _add_models_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    models = sub.add_parser("models", help="list and verify model packs")
    msub = models.add_subparsers(dest="models_command", required=True)
    mlist = msub.add_parser(
        "list", help="bundled packs (* marks the default), releases installed here (> serves)"
    )
    mlist.add_argument("--json", action="store_true", help="machine-readable output")
    mlist.set_defaults(func=cmd_models_list)
    mverify = msub.add_parser("verify", help="check every file's size and sha256")
    mverify.add_argument("packs", nargs="*", help="pack names or folders (default: all)")
    mverify.add_argument(
        "--pubkey", action="append", help="also check the release signature with this key"
    )
    mverify.set_defaults(func=cmd_models_verify)
    mfetch = msub.add_parser(
        "fetch", help="put a pack's large file (GGUF) into the model store, verified by sha256"
    )
    mfetch.add_argument("packs", nargs="+", help="pack names or folders")
    mfetch.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    mfetch.set_defaults(func=cmd_models_fetch)
    mkeygen = msub.add_parser("keygen", help="an Ed25519 key pair for signing model releases")
    mkeygen.add_argument("--out", required=True, help="folder for NAME.key and NAME.pub")
    mkeygen.add_argument("--name", default="release", help="file name stem (default: release)")
    mkeygen.set_defaults(func=cmd_models_keygen)
    msign = msub.add_parser("sign", help="sign a pack folder as a release")
    msign.add_argument("pack", help="pack folder")
    msign.add_argument("--key", required=True, help="private key (PEM) from `models keygen`")
    msign.add_argument(
        "--rollback",
        action="store_true",
        help="allow devices to install it below their committed version (no shadow trial)",
    )
    msign.set_defaults(func=cmd_models_sign)
    mpush = msub.add_parser("push", help="send a signed release to a device and follow it")
    mpush.add_argument("pack", help="signed pack folder")
    mpush.add_argument("--device", required=True, help="device id")
    mpush.add_argument(
        "--device-path", default="", help="the release is already on the device at this path"
    )
    mpush.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (600)")
    mpush.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    mpush.set_defaults(func=cmd_models_push)
    return msub


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("INFO" if args.command in ("run", "cloud") else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "batch", None) is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        sys.stderr.write(f"edge-agent: configuration error: {exc}\n")
        return EXIT_USAGE
    except EdgeAgentError as exc:
        sys.stderr.write(f"edge-agent: {exc}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
