"""`edge-agent demo` with a configured model store (issue 16: the demo ignored model.store_dir)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAKE_MANIFEST

pytestmark = pytest.mark.integration


def test_the_demo_opens_its_edge_pack_from_the_configured_model_store(tmp_path: Path) -> None:
    """A device pack whose model file lives only in ``model.store_dir`` (not the default store):
    the demo serves it instead of failing with "not in the model store"."""
    payload = b"weights kept in a model store of its own\n"
    sha = hashlib.sha256(payload).hexdigest()
    pack = tmp_path / "edge-pack"
    pack.mkdir()
    size = f"size = {len(payload)}\n"
    manifest = FAKE_MANIFEST.format(sha=sha, size=len(payload)).replace(
        size, size + "store = true\n"
    )
    manifest = manifest.replace("shape = [2, 4]", "shape = [6, 100]")  # the demo's windows
    manifest += '\n[fetch]\npip_package = "no-such-package"\nversion = "1.0"\nmember = "w/x.bin"\n'
    (pack / "manifest.toml").write_text(manifest)
    store = tmp_path / "store"
    (store / sha).mkdir(parents=True)
    (store / sha / "weights.bin").write_bytes(payload)
    config = tmp_path / "demo.toml"
    config.write_text(f'[model]\npack = "{pack}"\nstore_dir = "{store}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_MODEL_STORE_DIR"] = str(store)
    args = ["demo", "--config", str(config), "--loops", "1", "--rate-hz", "0", "--json", "-q"]
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["models"]["edge"] == "fake-pack@0.0.1"
    assert summary["readings"] == 40  # the bundled test windows, one pass
