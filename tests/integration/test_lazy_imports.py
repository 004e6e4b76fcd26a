"""Backends are imported lazily: a runtime is imported only when a pack asks for its backend.

Each check runs in a fresh interpreter (this one has imported everything by now) and reads
``sys.modules`` after ``import edge_agent`` (and the CLI), then after a real pack of the
other backend was opened, scored once and closed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import MODELS, ROOT

pytestmark = pytest.mark.integration

RUNTIMES = ("onnxruntime", "llama_cpp")

PROBE = """
import json, sys
import numpy as np
import edge_agent, edge_agent.cli
seen = {"import": [m for m in RUNTIMES if m in sys.modules]}
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import open_pack
from edge_agent.scoring.scorer import Scorer
scorer = Scorer.open(open_pack(PACK))
window = np.zeros(scorer.shape, dtype=np.float32)
scorer.score([Reading(seq=1, values=window)])
scorer.close()
seen["after"] = [m for m in RUNTIMES if m in sys.modules]
print(json.dumps(seen))
"""


def probe(pack: str) -> dict[str, list[str]]:
    code = f"RUNTIMES = {RUNTIMES!r}\nPACK = {str(MODELS / pack)!r}\n" + PROBE
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen: dict[str, list[str]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return seen


def test_importing_edge_agent_and_serving_an_onnx_pack_never_imports_llama_cpp() -> None:
    seen = probe("basicmotions-int8")
    assert seen["import"] == []
    assert seen["after"] == ["onnxruntime"]  # the pack's own runtime, and only that one


@pytest.mark.llm
def test_serving_a_llama_cpp_pack_never_imports_onnxruntime() -> None:
    seen = probe("smollm2-basicmotions")
    assert seen["import"] == []
    assert seen["after"] == ["llama_cpp"]
