"""The Debian package's unit and conffile, as packaging/deb/packaged_files.py derives them from
systemd/ (issue 19): the same hardening, the package's paths and system user, a config that
loads and puts the model store in the state folder."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from edge_agent.config import load_settings
from tests.conftest import ROOT

SYSTEMD = ROOT / "systemd"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "packaged_files", ROOT / "packaging" / "deb" / "packaged_files.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _directives(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line and not line.startswith(("#", ";")) and "=" in line
    ]


def test_the_packaged_unit_keeps_every_hardening_line_and_runs_as_the_package_user() -> None:
    source = (SYSTEMD / "edge-agent.service").read_text()
    unit = _module().unit(source)
    original, packaged = _directives(source), _directives(unit)
    assert set(original) - set(packaged) == {
        "DynamicUser=yes",
        *[d for d in original if d.startswith(("ExecStart=", "Documentation="))],
    }
    assert set(packaged) - set(original) == {
        "User=edge-agent",
        "Group=edge-agent",
        "ExecStart=/usr/bin/edge-agent run --config /etc/edge-agent/agent.toml",
        "Documentation=file:///usr/share/doc/edge-agent/README.Debian",
    }
    # What DynamicUser= implied must be there explicitly.
    for implied in ("ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "RemoveIPC=yes"):
        assert implied in packaged
    for implied in ("NoNewPrivileges=yes", "RestrictSUIDSGID=yes"):
        assert implied in packaged
    assert "/opt/edge-agent" not in unit


def test_an_edit_that_no_longer_applies_fails_the_build() -> None:
    source = (SYSTEMD / "edge-agent.service").read_text().replace("DynamicUser=yes\n", "")
    with pytest.raises(SystemExit, match="matched 0 times"):
        _module().unit(source)


def test_the_packaged_config_loads_and_keeps_the_store_in_the_state_folder(tmp_path: Path) -> None:
    module = _module()
    config = tmp_path / "agent.toml"
    source = (SYSTEMD / "agent.toml.example").read_text()
    config.write_text(module.apply(source, module.CONFIG_EDITS, "config"))
    settings = load_settings(str(config))
    assert settings.model.store_dir == "/var/lib/edge-agent/store"
    assert settings.device.state_dir == "/var/lib/edge-agent"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_packaged_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "edge-agent.service"
    unit.write_text(_module().unit((SYSTEMD / "edge-agent.service").read_text()))
    # The unit names /usr/bin/edge-agent, which exists only where the package is installed:
    # point it at something that exists here; every other check of verify applies.
    unit.write_text(
        unit.read_text().replace("ExecStart=/usr/bin/edge-agent", "ExecStart=/bin/true")
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    messages = [m for m in proc.stderr.splitlines() if "edge-agent.service" in m]
    assert proc.returncode == 0, proc.stderr
    assert not messages, proc.stderr
