"""`edge-agent models list` shows, besides the bundled packs, the releases installed in the
device's state folder and which one serves (issue 19: on a device the package's packs are
read-only; pushed releases live under ``<state_dir>/models``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.models.store import ModelStore, Pointer
from tests.conftest import MODELS


def _install(state: Path, folder: str, version: str) -> None:
    dest = state / "models" / "packs" / folder
    shutil.copytree(MODELS / "basicmotions-int8", dest)
    manifest = dest / "manifest.toml"
    text = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', manifest.read_text(), count=1)
    manifest.write_text(text)


def _list(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: Path, *flags: str
) -> str:
    monkeypatch.setenv("EDGE_AGENT_DEVICE_STATE_DIR", str(state))
    capsys.readouterr()
    assert main(["models", "list", *flags]) == 0
    return capsys.readouterr().out


def test_installed_releases_are_listed_with_the_one_that_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _install(tmp_path, "basicmotions-int8-1.0.1-aaaaaaaaaaaa", "1.0.1")
    _install(tmp_path, "basicmotions-int8-1.0.2-bbbbbbbbbbbb", "1.0.2")
    (tmp_path / "models" / "packs" / "not-a-pack").mkdir()
    pointer = Pointer(live="basicmotions-int8-1.0.2-bbbbbbbbbbbb")
    ModelStore(tmp_path).write_pointer(pointer)

    rows = json.loads(_list(monkeypatch, capsys, tmp_path, "--json"))
    installed = {r["version"]: r for r in rows if r.get("installed")}
    assert set(installed) == {"1.0.1", "1.0.2"}
    assert installed["1.0.2"]["live"] is True
    assert installed["1.0.1"]["live"] is False
    assert Path(installed["1.0.2"]["path"]).parent == tmp_path / "models" / "packs"
    bundled = [r for r in rows if not r.get("installed")]
    assert [r["name"] for r in bundled if r["default"]] == ["basicmotions-int8"]

    text = _list(monkeypatch, capsys, tmp_path)
    assert "> basicmotions-int8@1.0.2" in text
    assert "  basicmotions-int8@1.0.1" in text


def test_no_state_folder_lists_the_bundled_packs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = json.loads(_list(monkeypatch, capsys, tmp_path / "absent", "--json"))
    assert rows
    assert not any(r.get("installed") for r in rows)
