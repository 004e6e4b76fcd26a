"""The llama.cpp backend on the real SmolLM2 GGUF and the real smollm2-basicmotions pack.

These tests need the ``llm`` extra and the GGUF in the model store. When either is missing
they fail (they do not skip) and say what to run: ``pip install 'edge-agent[llm]'`` and
``edge-agent models fetch smollm2-basicmotions``. Select them with ``-m llm``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import ModelIntegrityError, ModelLoadError
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import ModelPack, open_pack
from edge_agent.scoring.backends.base import FloatArray
from edge_agent.scoring.scorer import Scorer
from tests.conftest import MODELS, ROOT, TEST_JSONL, assert_accuracy_within

pytestmark = [pytest.mark.integration, pytest.mark.llm]

PACK = MODELS / "smollm2-basicmotions"
FETCH_HINT = "edge-agent models fetch smollm2-basicmotions"


def _tolerance(pack: ModelPack) -> float:
    st = pack.manifest.selftest
    assert st is not None, "the LLM pack states its cross-build tolerance in [selftest]"
    assert st.on_load, "and has it checked at every load"
    return st.confidence_tolerance


def _ready_pack() -> ModelPack:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: pip install 'edge-agent[llm]'")
    pack = open_pack(PACK)
    try:
        pack.verify()
    except ModelIntegrityError as exc:
        pytest.fail(f"{exc}\n(the GGUF lives in the model store: run `{FETCH_HINT}`)")
    return pack


@pytest.fixture(scope="module")
def pack() -> ModelPack:
    return _ready_pack()


@pytest.fixture(scope="module")
def scorer(pack: ModelPack) -> Iterator[Scorer]:
    s = Scorer.open(pack)
    yield s
    s.close()


@pytest.fixture(scope="module")
def test_split() -> tuple[FloatArray, list[str]]:
    rows = [json.loads(line) for line in TEST_JSONL.read_text().splitlines() if line.strip()]
    x = np.asarray([r["values"] for r in rows], dtype=np.float32)
    return x, [r["label"] for r in rows]


def test_scores_the_test_split_with_the_manifest_accuracy(
    scorer: Scorer, test_split: tuple[FloatArray, list[str]]
) -> None:
    x, truth = test_split
    decisions = scorer.score([Reading(w, id=i) for i, w in enumerate(x)])
    assert [d.reading.id for d in decisions] == list(range(len(x)))
    accuracy = np.mean([d.label == t for d, t in zip(decisions, truth, strict=True)])
    expected = scorer.pack.manifest.metrics["accuracy_test"]
    assert isinstance(expected, float)
    # The pack was fitted on one build; this machine's build of llama.cpp may differ by up to
    # the pack's stated cross-build tolerance (measured, manifest [selftest]).
    assert_accuracy_within(
        [d.label for d in decisions],
        [d.confidence for d in decisions],
        truth,
        expected,
        _tolerance(scorer.pack),
    )
    assert accuracy >= 0.85
    for d in decisions:
        assert d.model == "smollm2-basicmotions@" + scorer.pack.manifest.version
        assert 0.25 <= d.confidence <= 1.0
        assert d.route in ("local", "hard")
        assert d.ood_score == 0.0  # every test window fits the encoding's scale


def test_probabilities_are_a_distribution(
    scorer: Scorer, test_split: tuple[FloatArray, list[str]]
) -> None:
    out = scorer.backend.score(test_split[0][0])
    assert out.probs.shape == (1, 4)
    assert out.probs.dtype == np.float32
    assert float(out.probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert out.ood_score is not None
    assert out.ood_score.shape == (1,)


def test_batch_and_single_readings_agree(
    scorer: Scorer, test_split: tuple[FloatArray, list[str]]
) -> None:
    x = test_split[0][:8]
    batch = scorer.backend.score_batch(x).probs
    singles = np.concatenate([scorer.backend.score(w).probs for w in x])
    # The language model's part is identical; the head's matrix product may round differently
    # for a stack than for one row.
    np.testing.assert_allclose(batch, singles, rtol=0, atol=1e-6)
    hidden = getattr(scorer.backend, "hidden", None)
    assert hidden is not None
    np.testing.assert_array_equal(hidden(x), np.concatenate([hidden(w[None]) for w in x]))


def test_cached_prefix_equals_a_full_evaluation(
    scorer: Scorer, test_split: tuple[FloatArray, list[str]]
) -> None:
    backend = scorer.backend
    hidden = getattr(backend, "hidden", None)
    assert hidden is not None, "the llama.cpp backend exposes hidden(windows, cached=...)"
    x = test_split[0][::5]
    cached = hidden(x, cached=True)
    full = hidden(x, cached=False)
    assert cached.shape == (len(x), 576)
    np.testing.assert_array_equal(cached, full)
    # The full evaluations left the prefix cached again: the fast path gives the same again.
    np.testing.assert_array_equal(hidden(x, cached=True), cached)


def test_a_window_off_the_encoding_scale_goes_to_the_cloud(
    scorer: Scorer, test_split: tuple[FloatArray, list[str]]
) -> None:
    loud = test_split[0][0] * 2000.0  # std far above the largest digit
    (d,) = scorer.score([Reading(loud, id="loud")])
    assert d.route == "hard"
    assert d.reason in ("out_of_range", "feature_outlier")
    assert d.ood_score is not None
    assert d.ood_score > 0.5


def _copy_pack(tmp_path: Path) -> Path:
    copy = tmp_path / "pack"
    shutil.copytree(PACK, copy)
    return copy


def test_a_tampered_head_is_refused(pack: ModelPack, tmp_path: Path) -> None:
    copy = _copy_pack(tmp_path)
    head = copy / "head.npy"
    data = bytearray(head.read_bytes())
    data[-3] ^= 0x01
    head.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"head\.npy.*sha256"):
        Scorer.open(open_pack(copy, pack.store_dir))


def test_a_tampered_gguf_is_refused(pack: ModelPack, tmp_path: Path) -> None:
    entry = next(f for f in pack.manifest.files if f.store)
    store = tmp_path / "store"
    target = store / entry.sha256 / entry.path
    target.parent.mkdir(parents=True)
    shutil.copyfile(pack.location(entry), target)
    with open(target, "r+b") as fh:
        fh.seek(entry.size // 2)
        byte = fh.read(1)
        fh.seek(entry.size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelIntegrityError, match=r"Q4_0\.gguf: sha256 .*" + FETCH_HINT):
        Scorer.open(open_pack(PACK, store))


def test_a_missing_gguf_says_how_to_fetch_it(tmp_path: Path) -> None:
    with pytest.raises(ModelIntegrityError, match=f"not in the model store; run `{FETCH_HINT}`"):
        open_pack(PACK, tmp_path / "empty-store").verify()


def test_without_the_extra_the_backend_is_a_clear_error() -> None:
    code = (
        "import sys\n"
        "sys.modules['llama_cpp'] = None  # as if llama-cpp-python were not installed\n"
        "import edge_agent, edge_agent.scoring.scorer, edge_agent.cli\n"
        "from edge_agent.scoring import backends\n"
        "from edge_agent.errors import BackendUnavailable\n"
        "try:\n"
        "    backends.create('llama_cpp')\n"
        "except BackendUnavailable as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    sys.exit('no error')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend 'llama_cpp' needs a runtime that is not installed" in proc.stdout
    assert "pip install 'edge-agent[llm]'" in proc.stdout


def _score_cli(
    model: str, stdin: bytes, env: dict[str, str] | None = None
) -> list[dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "score", "--model", model, "-q", "-"],
        input=stdin,
        capture_output=True,
        # A guard against a hang, not a speed bound: the generic build (no SIMD kernels) is
        # slow, and with four test suites on 2 cores (AMD EPYC) it took over 300 s.
        timeout=1200,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_cli_score_has_the_onnx_output_contract(pack: ModelPack) -> None:
    lines = TEST_JSONL.read_bytes().splitlines()[:4]
    stdin = b"\n".join([*lines, b"{not json"]) + b"\n"
    llm = _score_cli("smollm2-basicmotions", stdin)
    onnx = _score_cli("basicmotions-int8", stdin)
    assert len(llm) == len(onnx) == 5
    for a, b in zip(llm, onnx, strict=True):
        assert set(a) == set(b)
    assert llm[-1]["error"] == onnx[-1]["error"]
    for out, line in zip(llm[:4], lines, strict=True):
        assert out["id"] == json.loads(line)["id"]
        assert out["model"] == pack.ref
        assert out["label"] in pack.manifest.labels


def _rewrite_golden(copy: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change the copy's golden answers and list the new file's sha256 in its manifest."""
    golden = copy / "golden.jsonl"
    rows = [json.loads(x) for x in golden.read_text().splitlines() if x.strip()]
    old = hashlib.sha256(golden.read_bytes()).hexdigest()
    edit(rows[0])
    golden.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = golden.read_bytes()
    manifest = copy / "manifest.toml"
    text = manifest.read_text()
    entry = re.search(r'path = "golden.jsonl"\nsha256 = "[0-9a-f]+"\nsize = \d+', text)
    assert entry is not None
    assert old in entry.group(0)
    new = (
        f'path = "golden.jsonl"\nsha256 = "{hashlib.sha256(data).hexdigest()}"\nsize = {len(data)}'
    )
    manifest.write_text(text.replace(entry.group(0), new))


def test_golden_inputs_are_checked_at_every_load(pack: ModelPack, tmp_path: Path) -> None:
    """A build that decides a golden input otherwise than the pack says is refused at load."""
    copy = _copy_pack(tmp_path)
    tol = _tolerance(pack)

    def shift(row: dict[str, Any]) -> None:
        # As if this machine's build gave a confidence further from the pack's than it allows.
        row["confidence"] = row["confidence"] - 1.5 * tol if row["confidence"] > 0.5 else 1.0

    _rewrite_golden(copy, shift)
    with pytest.raises(ModelLoadError, match=r"golden inputs within its cross-build tolerance"):
        Scorer.open(open_pack(copy, pack.store_dir))
    copy2 = _copy_pack(tmp_path / "2")

    def relabel(row: dict[str, Any]) -> None:
        row["label"] = next(x for x in pack.manifest.labels if x != row["label"])

    _rewrite_golden(copy2, relabel)
    with pytest.raises(ModelLoadError, match=r"1 of \d+ golden inputs differ, e.g. #0"):
        Scorer.open(open_pack(copy2, pack.store_dir))


def _build(variant: str) -> Path:
    """A second build of llama.cpp (scripts/llm_builds.sh; scripts/test makes it beforehand)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "llm_builds.sh"), variant],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def test_another_build_of_llama_cpp_decides_the_same(pack: ModelPack) -> None:
    """The pack on a generic x86-64 build (no AVX, FMA or F16C: other kernels, other sums).

    It must load (its golden inputs within the stated tolerance), give every test window's
    confidence within that tolerance of this machine's build, and the same label wherever
    either build answers locally.
    """
    lib = _build("generic")
    stdin = TEST_JSONL.read_bytes()
    here = _score_cli("smollm2-basicmotions", stdin)
    other = _score_cli("smollm2-basicmotions", stdin, env={"LLAMA_CPP_LIB_PATH": str(lib)})
    tol = _tolerance(pack)
    assert len(here) == len(other) == 40
    for a, b in zip(here, other, strict=True):
        assert a["id"] == b["id"]
        assert abs(float(a["confidence"]) - float(b["confidence"])) <= tol, (a, b)
        if "local" in (a["route"], b["route"]):
            assert a["label"] == b["label"], (a, b)
