"""The out-of-distribution guard inside the ONNX graph decides like the numpy guard (issue 17).

The edge packs compute the guard in their graphs (scripts/graph_guard.py); the numpy
``OodCheck`` stays for backends that cannot (llama.cpp) and packs without the output. Both
must give the same reason on every window: the test and train windows, and hostile ones
(dead, shifted, clipped, huge, tiny-noise channels, random noise). Exact equality: both
compare float32 reductions of the same values against the same float32 limits, and on
these windows no statistic sits within rounding of a limit.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_agent.devtools.measure import load_lines, windows_of
from edge_agent.errors import ModelLoadError
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import BUNDLED_TEST_DATA, open_pack, resolve
from edge_agent.scoring.guard import OodCheck, graph_reasons
from edge_agent.scoring.scorer import Scorer
from tests.conftest import MODELS

EDGE_PACKS = ("basicmotions-int8", "basicmotions-fp32")


def _hostile(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = []
    for w0 in base:
        for c in range(w0.shape[0]):
            for edit in range(9):
                w = w0.copy()
                if edit == 0:
                    w[c] = w[c, 0]  # stuck at its first value
                elif edit == 1:
                    w[c] = 0.0  # disconnected
                elif edit == 2:
                    w[c, 5] = 1e3  # one wild sample
                elif edit == 3:
                    w[c] = np.minimum(w[c], np.quantile(w[c], 0.7))  # clipped high
                elif edit == 4:
                    w[c] = np.maximum(w[c], np.quantile(w[c], 0.25))  # clipped low
                elif edit == 5:
                    w[c] = 1e30  # huge and constant
                elif edit == 6:
                    w[c] = -3.4e38
                elif edit == 7:
                    w[c] += rng.normal(0, 5, w.shape[1])  # noisy but plausible
                else:
                    w[c] = w[c, 0] + rng.normal(0, 1e-4, w.shape[1])  # nearly stuck
                out.append(w)
    return np.stack(out).astype(np.float32)


def _windows() -> np.ndarray:
    rng = np.random.default_rng(17)
    test = windows_of(load_lines(BUNDLED_TEST_DATA))
    train = windows_of(load_lines(BUNDLED_TEST_DATA.parent / "train.jsonl"))
    noise = rng.normal(0, 30, (300, *test.shape[1:]))
    return np.concatenate([test, train, _hostile(test[:10], rng), 3 * test, noise]).astype(
        np.float32
    )


@pytest.mark.parametrize("name", EDGE_PACKS)
def test_graph_guard_and_numpy_guard_agree_on_every_window(name: str) -> None:
    scorer = Scorer.open(resolve(name))
    x = _windows()
    with np.errstate(over="ignore"):  # the +-3.4e38 windows overflow numpy's float32 std
        want = OodCheck(scorer.pack).reasons(x)
    out = scorer.backend.score_batch(x)
    assert out.guard is not None, "the edge packs compute the guard in their graph"
    have = graph_reasons(out.guard.tolist())
    wrong = [(i, h, w) for i, (h, w) in enumerate(zip(have, want, strict=True)) if h != w]
    assert not wrong, wrong[:5]
    seen = Counter(want)
    # Every reason occurs (so agreement is not "both say nothing").
    assert all(seen[r] > 20 for r in ("dead_sensor", "out_of_range", "saturated", None)), seen
    # One window at a time (the latency path) gives the same as the batch.
    singles = [scorer.backend.score_batch(x[i : i + 1]).guard for i in range(0, len(x), 7)]
    assert [graph_reasons(g.tolist())[0] for g in singles if g is not None] == have[::7]


@pytest.mark.parametrize("name", EDGE_PACKS)
def test_decisions_carry_the_graph_guard_reason(name: str) -> None:
    scorer = Scorer.open(resolve(name))
    x = _windows()
    decisions = scorer.score([Reading(values=w) for w in x])
    with np.errstate(over="ignore"):
        want = OodCheck(scorer.pack).reasons(x)
    for d, reason in zip(decisions, want, strict=True):
        if reason is not None:
            assert (d.route, d.reason) == ("hard", reason)
        else:
            assert d.reason not in ("dead_sensor", "out_of_range", "saturated")


def _copy_with(tmp_path: Path, name: str, old: str, new: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(MODELS / name, dest)
    manifest = dest / "manifest.toml"
    text, n = re.subn(old, new, manifest.read_text(), count=1, flags=re.MULTILINE)
    assert n == 1
    manifest.write_text(text)
    return dest


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (r"^saturation_fraction = .*$", "saturation_fraction = 0.7"),
        (r"^dead_channel_std = .*$", "dead_channel_std = 0.0"),
        (r"^range_margin = .*$", "range_margin = 2.0"),
        (r"^channel_max = \[[-0-9.]+", "channel_max = [40.0"),
    ],
)
def test_a_graph_that_disagrees_with_its_manifest_is_refused(
    tmp_path: Path, old: str, new: str
) -> None:
    pack = open_pack(_copy_with(tmp_path, "basicmotions-int8", old, new))
    with pytest.raises(ModelLoadError, match=r"does not decide like the manifest's \[ood\]"):
        Scorer.open(pack)
    # The same table without the graph's guard output: the numpy guard serves it.
    plain = _copy_with(tmp_path / "plain", "basicmotions-int8", old, new)
    manifest = plain / "manifest.toml"
    manifest.write_text(re.sub(r'(?m)^guard = "ood_guard"\n', "", manifest.read_text()))
    scorer = Scorer.open(open_pack(plain))
    assert scorer.backend.score_batch(np.zeros((1, *scorer.shape), np.float32)).guard is None
    assert scorer.check_graph_guard() == ""
