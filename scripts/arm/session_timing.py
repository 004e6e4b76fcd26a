"""Time raw ``InferenceSession.run`` of a model pack at batch 1 and print one JSON line.

scripts/arm_check.sh runs this twice, natively and as aarch64 under qemu, so the two
figures come from the same code on the same model and inputs. The session is set up as
the ONNX backend sets it up (one intra-op thread, sequential, no spinning, all graph
optimisations). Besides the timing it prints the probabilities of every input window (and
their sha256), so the caller can tell how far apart the two architectures' outputs are.

    python scripts/arm/session_timing.py DATA.jsonl [--model PACK] [--seconds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from edge_agent.models.pack import resolve


def _session(model_path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model_path, sess_options=so, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="JSON lines with a 'values' field (channels x samples)")
    parser.add_argument("--model", default="", help="pack name or folder (default: default pack)")
    parser.add_argument("--seconds", type=float, default=2.0, help="least time spent timing")
    parser.add_argument("--min-runs", type=int, default=200, help="least number of timed runs")
    args = parser.parse_args()

    pack = resolve(args.model)
    pack.verify()
    manifest = pack.manifest
    if manifest.backend != "onnx" or manifest.outputs is None:
        parser.error(f"{pack.ref} is not an ONNX pack")
    model = next(f.path for f in manifest.files if f.path.endswith(".onnx"))
    session = _session(str(pack.file(model)))
    shape = tuple(manifest.input.shape)
    windows = []
    with open(args.data, "rb") as fh:
        for line in fh:
            if line.strip():
                values = np.asarray(json.loads(line)["values"], dtype=np.float32)
                if values.shape == shape:
                    windows.append(values[np.newaxis])
    if not windows:
        parser.error(f"{args.data}: no window of shape {list(shape)}")
    feed_name, outputs = manifest.input.name, [manifest.outputs.probs]

    probs = np.concatenate([session.run(outputs, {feed_name: w})[0] for w in windows])  # warm-up
    probs = probs.astype(np.float32)

    times_us: list[float] = []
    started = time.perf_counter()
    i = 0
    while len(times_us) < args.min_runs or time.perf_counter() - started < args.seconds:
        feed = {feed_name: windows[i % len(windows)]}
        t0 = time.perf_counter_ns()
        session.run(outputs, feed)
        times_us.append((time.perf_counter_ns() - t0) / 1000)
        i += 1
    times_us.sort()
    result = {
        "machine": platform.machine(),
        "pack": pack.ref,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "runs": len(times_us),
        "median_us": round(statistics.median(times_us), 2),
        "p99_us": round(times_us[min(len(times_us) - 1, int(len(times_us) * 0.99))], 2),
        "windows": len(windows),
        "probs_sha256": hashlib.sha256(probs.tobytes()).hexdigest(),
        "probs": [float(p) for p in probs.ravel()],
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
