"""Shared test helpers: paths to the bundled data and packs, a throwaway fake pack."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
TEST_JSONL = ROOT / "data" / "basicmotions" / "test.jsonl"
TRAIN_JSONL = ROOT / "data" / "basicmotions" / "train.jsonl"

#: How far an ONNX pack's probabilities may move between builds and CPUs: at most 1.2e-7
#: measured between x86-64 (AVX2 and AVX-512) and aarch64 (docs/arm.md); the bound is the one
#: scripts/arm_check.sh compares confidences with, ~100x that.
ONNX_CROSS_BUILD_TOLERANCE = 1e-5


def assert_accuracy_within(
    predicted: list[str], confidences: list[float], truth: list[str], expected: float, tol: float
) -> None:
    """The accuracy equals ``expected`` up to the windows another build could decide otherwise.

    A window's label can only change between builds when its confidence may meet the
    runner-up's: when it is at most 0.5 + ``tol`` (above that the runner-up is below
    0.5 - ``tol``, and ``tol`` is how far a probability moves between builds, measured). So the
    accuracy may differ from the manifest's (fitted on one build) by those windows, no more.
    """
    n = len(truth)
    assert len(predicted) == len(confidences) == n
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / n
    close = sum(c <= 0.5 + tol for c in confidences)
    assert abs(accuracy - expected) <= close / n + 1e-9, (
        f"accuracy {accuracy} vs {expected} in the manifest; only {close} of {n} windows are"
        f" close enough to a tie (confidence <= 0.5 + {tol}) to be decided otherwise by another"
        " build"
    )


FAKE_MANIFEST = """\
schema_version = 1
name = "fake-pack"
version = "0.0.1"
backend = "fake"
labels = ["a", "b", "c"]

[[files]]
path = "weights.bin"
sha256 = "{sha}"
size = {size}

[input]
name = "window"
shape = [2, 4]

[routing]
confidence_threshold = 0.8
"""


def make_fake_pack(folder: Path, payload: bytes = b"fake weights\n") -> Path:
    """Write a pack served by the fake backend; returns its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    (folder / "manifest.toml").write_text(FAKE_MANIFEST.format(sha=sha, size=len(payload)))
    return folder


@pytest.fixture
def fake_pack(tmp_path: Path) -> Path:
    return make_fake_pack(tmp_path / "fake-pack")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, stopped by its PID at the end."""
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A topic namespace of the test's own."""
    return "t/" + re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:60]


def settings_env(port: int, prefix: str, state_dir: Path, **extra: str) -> dict[str, str]:
    """EDGE_AGENT_* variables for a device talking to a test broker."""
    env = {
        "EDGE_AGENT_MQTT_PORT": str(port),
        "EDGE_AGENT_MQTT_TOPIC_PREFIX": prefix,
        "EDGE_AGENT_DEVICE_STATE_DIR": str(state_dir),
        "EDGE_AGENT_DEVICE_ID": "dev1",
        "EDGE_AGENT_MQTT_KEEPALIVE_S": "5",
        "EDGE_AGENT_LINK_RECONNECT_MIN_S": "0.05",
        "EDGE_AGENT_LINK_RECONNECT_MAX_S": "0.5",
    }
    env.update({f"EDGE_AGENT_{k.upper()}": v for k, v in extra.items()})
    return env


def puback_env(port: int, prefix: str, state_dir: Path, **extra: str) -> dict[str, str]:
    """``settings_env`` for tests without a cloud worker answering: the broker's PUBACK
    settles a hard case (``link.confirm = "puback"``) instead of the cloud's verdict."""
    return settings_env(port, prefix, state_dir, link_confirm="puback", **extra)
