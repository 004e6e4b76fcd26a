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
