"""A pack's golden inputs: answers its scorer must reproduce before it may serve.

``[selftest]`` in a manifest names a JSON-lines file of the pack (``{"values", "label",
"confidence"}`` per line). A release candidate is self-tested before its shadow trial
(rollout/machine.py). A pack whose runtime computes differently on another CPU or build (the
llama.cpp packs) also sets ``on_load = true``: ``Scorer.open`` then runs the golden inputs
through the machine's own build at every load and refuses the pack when a label differs or a
confidence moves by more than ``confidence_tolerance``, the cross-build difference the pack
was measured and fitted to withstand. So a device never silently serves decisions that differ
from the ones the pack was checked with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from edge_agent.errors import EdgeAgentError, ModelError
from edge_agent.ingest.readings import ReadingDecoder

if TYPE_CHECKING:
    from edge_agent.scoring.scorer import Scorer

#: Largest golden line accepted (a 6 x 100 window is ~6 KB).
_MAX_LINE_BYTES = 1 << 20


class _Golden(msgspec.Struct, frozen=True):
    values: list[list[float]]
    label: str
    confidence: float


def self_test(scorer: Scorer) -> str:
    """Score the pack's golden inputs; "" when every one matches, else what did not."""
    st = scorer.pack.manifest.selftest
    if st is None:
        return "the pack has no [selftest] golden inputs"
    try:
        lines = scorer.pack.file(st.file).read_bytes().splitlines()
        golden = [msgspec.json.decode(x, type=_Golden) for x in lines if x.strip()]
    except (OSError, msgspec.MsgspecError, ModelError) as exc:
        return f"golden inputs unreadable: {exc}"
    if not golden:
        return "the golden inputs file is empty"
    decoder = ReadingDecoder(scorer.shape, _MAX_LINE_BYTES)
    try:
        readings = [decoder.from_values(g.values) for g in golden]
        decisions = scorer.score(readings)
    except EdgeAgentError as exc:
        return f"scoring the golden inputs failed: {exc}"
    wrong = [
        (i, g.label, g.confidence, d.label, round(d.confidence, 4))
        for i, (g, d) in enumerate(zip(golden, decisions, strict=True))
        if d.label != g.label or abs(d.confidence - g.confidence) > st.confidence_tolerance
    ]
    if wrong:
        i, want, want_conf, got, got_conf = wrong[0]
        return (
            f"{len(wrong)} of {len(golden)} golden inputs differ, e.g. #{i}: {got} {got_conf}"
            f" where the pack says {want} {want_conf}"
        )
    return ""
