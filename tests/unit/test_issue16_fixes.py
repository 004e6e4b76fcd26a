"""Bugs found while giving every job its own room (issue 16), one test each.

- The cloud worker resolved its pack without ``model.store_dir``: a configured model store
  was ignored, so a cloud pack with a file in the store could not be opened.
- ``models push`` decoded the device's events untyped inside paho's callback: a malformed
  event raised in paho's network thread (and a wrong one broke the wait for the answer).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import load_settings
from edge_agent.devtools.localbroker import free_port
from edge_agent.errors import ModelIntegrityError
from edge_agent.rollout.push import EventInbox
from edge_agent.wire.messages import ModelEvent
from tests.conftest import FAKE_MANIFEST


def _pack_with_a_store_file(tmp_path: Path) -> tuple[Path, Path]:
    """A fake pack whose weights live in a model store of their own (``store = true``)."""
    payload = b"weights kept in the model store\n"
    sha = hashlib.sha256(payload).hexdigest()
    pack = tmp_path / "cloud-pack"
    pack.mkdir()
    manifest = FAKE_MANIFEST.format(sha=sha, size=len(payload))
    size = f"size = {len(payload)}\n"
    manifest = manifest.replace(size, size + "store = true\n")
    manifest += '\n[fetch]\npip_package = "no-such-package"\nversion = "1.0"\nmember = "w/x.bin"\n'
    (pack / "manifest.toml").write_text(manifest)
    store = tmp_path / "store"
    (store / sha).mkdir(parents=True)
    (store / sha / "weights.bin").write_bytes(payload)
    return pack, store


def test_the_cloud_worker_opens_its_pack_from_the_configured_model_store(tmp_path: Path) -> None:
    pack, store = _pack_with_a_store_file(tmp_path)
    env = {
        "EDGE_AGENT_CLOUD_PACK": str(pack),
        "EDGE_AGENT_MQTT_PORT": str(free_port()),  # nothing listens: the worker retries
        "EDGE_AGENT_DEVICE_STATE_DIR": str(tmp_path / "state"),
    }
    worker = CloudWorker(load_settings(None, env={**env, "EDGE_AGENT_MODEL_STORE_DIR": f"{store}"}))
    worker.start()
    try:
        assert worker.scorer.ref == "fake-pack@0.0.1"
    finally:
        worker.stop(timeout=5)
    # The same pack without the store configured is a clear integrity error, not a guess.
    elsewhere = tmp_path / "empty-store"
    other = CloudWorker(
        load_settings(None, env={**env, "EDGE_AGENT_MODEL_STORE_DIR": str(elsewhere)})
    )
    with pytest.raises(ModelIntegrityError, match="not in the model store"):
        other.start()


def _message(payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=b"edge/dev-1/model")
    msg.payload = payload
    return msg


def test_push_counts_malformed_device_events_instead_of_raising_in_paho_thread() -> None:
    inbox = EventInbox()
    malformed = [
        b"not json",
        b"[1, 2]",
        b'{"v": 1}',
        b'{"v": 1, "device": "dev-1", "state": "no-such-state", "live": "x"}',
        b'{"v": 1, "device": "dev-1", "state": "promoted", "live": "x", "details": 3}',
        b"\xff\xfe",
    ]
    for payload in malformed:
        inbox.on_message(None, None, _message(payload))  # type: ignore[arg-type]
    assert inbox.malformed == len(malformed)
    assert inbox.events.empty()
    good = ModelEvent(v=1, device="dev-1", state="promoted", live="m@2", release="r1")
    inbox.on_message(None, None, _message(msgspec.json.encode(good)))  # type: ignore[arg-type]
    got = inbox.events.get_nowait()
    assert (got.state, got.release, got.live) == ("promoted", "r1", "m@2")
