"""What each speed lever of the llama.cpp path is worth on this machine (docs/backends.md).

Times ``LlamaRunner.hidden(text)`` -- one reading: the suffix decoded after the cached prefix,
the last token's hidden state read -- for every combination asked for, interleaved round-robin
so that a busy machine slows every combination alike, and prints p50/p95 per combination and
its ratio to the first. In-process: the floor under ``edge-agent score``, whose round trip from
outside adds JSON, validation, the head and the pipe (``edge-agent bench`` measures that).

    python scripts/llm_levers.py [--models GGUF ...] [--threads 1 2] [--suffix 6 7 9]
        [--ubatch 32] [--extra-buffers] [-n 100]

Without ``--models``: the Q4_1 GGUF from the wheel and its Q4_0 and Q8_0 requantizations,
made in a temporary folder with llama.cpp's quantizer (the same call ``models fetch`` uses).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

from edge_agent.models.pack import default_store_dir
from edge_agent.scoring.backends.llama_cpp import LlamaRunner, quantize_gguf

PREFIX = "Activity from smartwatch motion levels:"
SOURCE = default_store_dir() / (
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53/SmolLM2-135M-Instruct.Q4_1.gguf"
)
#: Suffixes of n tokens in SmolLM2's tokenizer (every digit and the newline is one token).
DIGITS = "665546231"


def suffix(n: int) -> str:
    return DIGITS[: n - 1] + "\n" if n > len(DIGITS) else DIGITS[:n]


def default_models(tmp: Path) -> list[Path]:
    if not SOURCE.is_file():
        raise SystemExit(f"{SOURCE} is missing: pass --models, or fetch the Q4_1 GGUF there")
    out = [SOURCE]
    for kind in ("q4_0", "q8_0"):
        target = tmp / f"SmolLM2-135M-Instruct.{kind.upper()}.gguf"
        quantize_gguf(SOURCE, target, kind)
        out.append(target)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", type=Path, nargs="*")
    ap.add_argument("--threads", type=int, nargs="*", default=[2])
    ap.add_argument("--suffix", type=int, nargs="*", default=[6])
    ap.add_argument("--ubatch", type=int, nargs="*", default=[32])
    ap.add_argument("--extra-buffers", action="store_true", help="also with repacked weights")
    ap.add_argument("-n", type=int, default=100, help="readings per combination")
    args = ap.parse_args()
    print(llama_cpp.llama_print_system_info().decode().strip())
    print(f"load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or default_models(Path(tmp))
        extra = [False, True] if args.extra_buffers else [False]
        combos = list(itertools.product(models, args.threads, args.ubatch, extra))
        runners = {
            c: LlamaRunner(c[0], PREFIX, n_ctx=64, n_ubatch=c[2], threads=c[1], extra_buffers=c[3])
            for c in combos
        }
        times: dict[tuple[object, ...], list[float]] = {}
        for _ in range(args.n):
            for combo, n_tokens in itertools.product(combos, args.suffix):
                text = suffix(n_tokens)
                t0 = time.perf_counter()
                runners[combo].hidden(text)
                times.setdefault((*combo, n_tokens), []).append((time.perf_counter() - t0) * 1e3)
        for r in runners.values():
            r.close()
    base = None
    cols = ("model", "threads", "n_ubatch", "extra buffers", "suffix tokens", "p50 ms", "p95 ms")
    print("| " + " | ".join(cols) + " | p50 ratio |")
    print("|---" * (len(cols) + 1) + "|")
    for (model, threads, ubatch, ext, n_tokens), t in times.items():
        p50, p95 = np.percentile(t, [50, 95])
        base = base or p50
        print(
            f"| {Path(str(model)).name} | {threads} | {ubatch} | {ext} | {n_tokens} |"
            f" {p50:.1f} | {p95:.1f} | {p50 / base:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
