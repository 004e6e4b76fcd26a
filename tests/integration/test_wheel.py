"""The wheel on its own: built from the checkout, installed into a new venv outside it, and run
as a user who never saw the repository runs it (issue 19).

The bundled packs and data must come from the installed package (site-packages), found through
importlib.resources; nothing may be read from the checkout. The venv's dependencies come from
the package index through pip, as for any user (pip's cache makes that quick).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from tests.conftest import ONNX_CROSS_BUILD_TOLERANCE, ROOT, assert_accuracy_within

pytestmark = pytest.mark.integration

#: Not part of the source a wheel is built from.
_IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "state"
)


class Installed:
    def __init__(self, prefix: Path, home: Path) -> None:
        self.prefix = prefix
        self.home = home

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("EDGE_AGENT_", "PYTHON", "VIRTUAL_ENV", "XDG_"))
        }
        env["HOME"] = str(self.home)  # the model store default (~/.cache) is the user's own
        env["PATH"] = f"{self.prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(
            [str(self.prefix / "bin" / "edge-agent"), *args],
            cwd=self.home,  # outside the checkout
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_IGNORED)
    dist = base / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("edge_agent-*.whl")
    prefix = base / "venv"
    venv.create(prefix, with_pip=True, symlinks=True)
    install = subprocess.run(
        [str(prefix / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    home = base / "home"
    home.mkdir()
    return Installed(prefix, home)


def _site_packages(installed: Installed) -> Path:
    (site,) = (installed.prefix / "lib").glob("python3.*/site-packages")
    return site


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    proc = subprocess.run(
        [
            str(installed.prefix / "bin" / "python"),
            "-c",
            "import edge_agent; print(edge_agent.__file__)",
        ],
        cwd=installed.home,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(proc.stdout.strip()).is_relative_to(_site_packages(installed))


def test_score_example_with_the_default_pack_as_its_manifest_says(installed: Installed) -> None:
    proc = installed.run("score", "--example")
    assert proc.returncode == 0, proc.stderr
    outputs = [json.loads(x) for x in proc.stdout.splitlines()]
    bundled = _site_packages(installed) / "edge_agent" / "bundled"
    truth = [
        json.loads(x) for x in (bundled / "data/basicmotions/test.jsonl").read_text().splitlines()
    ]
    assert len(outputs) == len(truth) == 40
    manifest = tomllib.loads((bundled / "packs/basicmotions-int8/manifest.toml").read_text())
    assert {o["model"] for o in outputs} == {f"basicmotions-int8@{manifest['version']}"}
    assert_accuracy_within(
        [o["label"] for o in outputs],
        [o["confidence"] for o in outputs],
        [t["label"] for t in truth],
        manifest["metrics"]["accuracy_test"],
        ONNX_CROSS_BUILD_TOLERANCE,
    )
    assert "scored 40 of 40 lines" in proc.stderr


def test_models_list_shows_the_bundled_packs(installed: Installed) -> None:
    proc = installed.run("models", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    packs = {p["name"]: p for p in json.loads(proc.stdout)}
    assert {"basicmotions-int8", "basicmotions-fp32", "basicmotions-cloud"} <= set(packs)
    assert [n for n, p in packs.items() if p["default"]] == ["basicmotions-int8"]
    for name in ("basicmotions-int8", "basicmotions-fp32", "basicmotions-cloud"):
        assert Path(packs[name]["path"]).is_relative_to(_site_packages(installed))
    verify = installed.run("models", "verify", "basicmotions-int8", "basicmotions-cloud")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_demo_runs_from_the_wheel(installed: Installed) -> None:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed (scripts/setup --dev installs it)")
    proc = installed.run("demo", "--loops", "1", "--rate-hz", "0", "--json", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["readings"] == 40
    assert summary["drained"] is True
    packs = _site_packages(installed) / "edge_agent" / "bundled" / "packs"
    refs = {}
    for role, name in (("edge", "basicmotions-int8"), ("cloud", "basicmotions-cloud")):
        manifest = tomllib.loads((packs / name / "manifest.toml").read_text())
        refs[role] = f"{name}@{manifest['version']}"
    assert summary["models"] == refs
