"""Upgrade the installed Debian package in a Debian root and check what must survive it.

Run by scripts/deb_check.sh as root, with the checkout's venv, on a root (a chroot) where
the older package is installed and configured by apt:

    python scripts/deb/upgrade_check.py --root ROOT --new-deb /tmp/edge-agent_X_amd64.deb \
        --work DIR

1. The configuration is edited as an operator would (device id, the broker's port).
2. The packaged agent runs in the root as the ``edge-agent`` user (its own /usr/bin/edge-agent
   and /etc/edge-agent/agent.toml), replaying the bundled test windows with sensor noise,
   against a private mosquitto on loopback and no cloud worker: its hard cases wait in the
   outbox for verdicts that do not come.
3. A signed release (the default pack as version 1.1.1) is pushed to it from the checkout with
   ``edge-agent models push`` and must be promoted; the agent is then stopped (SIGTERM).
4. ``apt-get install`` of the newer package inside the root (an upgrade).
5. Checked after it: the new version is installed; agent.toml is byte for byte the edited
   one, with no .dpkg-* copy beside it; the outbox holds the same hard cases; the release
   pointer is unchanged. Then, with a cloud worker on the broker, the upgraded agent runs with
   ``--exit-when-drained``: it must serve the pushed release (its log says so) and empty the
   outbox (exit 0), i.e. every hard case accepted before the upgrade gets its verdict.

Prints one JSON object with the figures; exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.models.pack import BUNDLED_PACKS_DIR

DEVICE = "fresh-device-1"
PACK = "basicmotions-int8"
RELEASE_VERSION = "1.1.1"
STATE = "var/lib/edge-agent"
CONFIG = "etc/edge-agent/agent.toml"
SITE = "/usr/lib/edge-agent/lib/python3.11/site-packages"
TEST_DATA = f"{SITE}/edge_agent/bundled/data/basicmotions/test.jsonl"


class CheckFailed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)
    print(f"upgrade_check: ok: {what}", file=sys.stderr)


def host(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    """The checkout's edge-agent (the operator's and the cloud's side)."""
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise CheckFailed(
            f"edge-agent {' '.join(args)}: rc {proc.returncode}: {proc.stderr[-2000:]}"
        )
    return proc.stdout


def in_root(root: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
    }
    return subprocess.run(
        ["chroot", str(root), *cmd],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def agent_cmd(root: Path, port: int, extra: dict[str, str], *args: str) -> list[str]:
    """The packaged agent as the edge-agent user, configured by /etc/edge-agent/agent.toml
    plus the given EDGE_AGENT_* overrides (what a systemd drop-in would set)."""
    env = [f"EDGE_AGENT_{k.upper()}={v}" for k, v in extra.items()]
    return [
        "chroot", "--userspec=edge-agent:edge-agent", str(root),
        "env", "-i", "PATH=/usr/bin:/bin", "HOME=/var/lib/edge-agent", "PYTHONUNBUFFERED=1", *env,
        "/usr/bin/edge-agent", "run", "--config", "/etc/edge-agent/agent.toml", *args,
    ]  # fmt: skip


def outbox_rows(root: Path) -> list[tuple[int, str]]:
    db = root / STATE / "outbox.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sorted(con.execute("SELECT cls, key FROM messages").fetchall())
    finally:
        con.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_config(root: Path, port: int) -> None:
    path = root / CONFIG
    text = path.read_text()
    text, n1 = re.subn(r'(?m)^#id = ".*"$', f'id = "{DEVICE}"', text, count=1)
    text, n2 = re.subn(r"(?m)^port = 1883$", f"port = {port}", text, count=1)
    if n1 != 1 or n2 != 1:
        raise CheckFailed("the packaged agent.toml no longer has '#id = ...' and 'port = 1883'")
    path.write_text(text)


def make_release(work: Path) -> Path:
    keys = work / "keys"
    host("models", "keygen", "--out", str(keys))
    release = work / "release" / PACK
    shutil.rmtree(release.parent, ignore_errors=True)
    shutil.copytree(BUNDLED_PACKS_DIR / PACK, release)
    manifest = release / "manifest.toml"
    text = re.sub(
        r'(?m)^version = ".*"$', f'version = "{RELEASE_VERSION}"', manifest.read_text(), count=1
    )
    manifest.write_text(text)
    host("models", "sign", str(release), "--key", str(keys / "release.key"))
    return keys / "release.pub"


def trust(root: Path, pub: Path) -> None:
    folder = root / STATE / "trusted-keys"
    folder.mkdir(exist_ok=True)
    shutil.copy(pub, folder / "release.pub")
    owner = in_root(root, "chown", "-R", "edge-agent:edge-agent", f"/{STATE}/trusted-keys")
    check(owner.returncode == 0, "trusted key installed for the edge-agent user")


def before_upgrade(root: Path, work: Path, broker: Mosquitto) -> dict[str, Any]:
    pub = make_release(work)
    trust(root, pub)
    log = (work / "agent-before.log").open("w")
    overrides = {
        "source_kind": "replay",
        "source_path": TEST_DATA,
        "source_loops": "0",
        "source_rate_hz": "200",
        "source_noise": "1.5",
        "rollout_shadow_readings": "100",
        "rollout_health_readings": "100",
        "telemetry_interval_s": "1",
    }
    agent = subprocess.Popen(agent_cmd(root, broker.port, overrides), stdout=log, stderr=log)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env.update(EDGE_AGENT_MQTT_PORT=str(broker.port), EDGE_AGENT_DEVICE_ID="operator")
        time.sleep(2)  # the device subscribes to its command topic once connected
        event = json.loads(
            host("models", "push", str(work / "release" / PACK), "--device", DEVICE, env=env)
        )
        check(
            event.get("state") == "promoted",
            f"the pushed release was promoted ({event.get('state')})",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not outbox_rows(root):
            time.sleep(0.5)
        time.sleep(2)  # the health window (100 readings) and a few more hard cases
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(30)
        log.close()
    check(code == 0, f"the agent stopped cleanly on SIGTERM (rc {code})")
    return {"push_state": event.get("state")}


def after_upgrade(root: Path, work: Path, broker: Mosquitto) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(EDGE_AGENT_MQTT_PORT=str(broker.port), EDGE_AGENT_DEVICE_ID="cloud")
    cloud_log = (work / "cloud.log").open("w")
    cloud = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "cloud"], env=env, stdout=cloud_log, stderr=cloud_log
    )
    try:
        time.sleep(2)  # subscribed
        overrides = {"source_kind": "jsonl", "source_path": "/dev/null"}
        started = time.monotonic()
        proc = subprocess.run(
            agent_cmd(
                root, broker.port, overrides, "--exit-when-drained", "--drain-timeout", "120"
            ),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        drained_s = time.monotonic() - started
    finally:
        cloud.send_signal(signal.SIGTERM)
        cloud.wait(30)
        cloud_log.close()
    (work / "agent-after.log").write_text(proc.stderr)
    serving = f"serving the installed release {PACK}@{RELEASE_VERSION}"
    check(serving in proc.stderr, f"after the upgrade the agent logs '{serving}'")
    check(proc.returncode == 0, f"the upgraded agent drained the outbox (rc {proc.returncode})")
    check(outbox_rows(root) == [], "the outbox is empty: every hard case got its verdict")
    return {"drain_s": round(drained_s, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--new-deb", required=True, help="the newer package, as a path inside the root")
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()
    root, work = args.root, args.work
    work.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(work / "broker").start()
    result: dict[str, Any] = {}
    try:
        edit_config(root, broker.port)
        config_sha = sha256(root / CONFIG)
        result.update(before_upgrade(root, work, broker))
        rows = outbox_rows(root)
        pointer = (root / STATE / "models" / "current.json").read_bytes()
        check(len(rows) > 0, f"hard cases wait in the outbox before the upgrade ({len(rows)})")
        old = in_root(root, "dpkg-query", "-W", "-f=${Version}", "edge-agent").stdout
        started = time.monotonic()
        apt = in_root(root, "apt-get", "install", "-y", "-q", args.new_deb)
        result["upgrade_s"] = round(time.monotonic() - started, 1)
        (work / "apt-upgrade.log").write_text(apt.stdout + apt.stderr)
        check(apt.returncode == 0, f"apt-get install of the newer package (rc {apt.returncode})")
        new = in_root(root, "dpkg-query", "-W", "-f=${Version}", "edge-agent").stdout
        check(new != old and new in args.new_deb, f"upgraded from {old} to {new}")
        check(sha256(root / CONFIG) == config_sha, "the edited agent.toml is kept byte for byte")
        leftovers = sorted(p.name for p in (root / CONFIG).parent.glob("agent.toml.*"))
        check(not leftovers, f"no .dpkg-* copy beside agent.toml ({leftovers})")
        check(outbox_rows(root) == rows, f"the outbox holds the same {len(rows)} hard cases")
        pointer_after = (root / STATE / "models" / "current.json").read_bytes()
        check(pointer_after == pointer, "the release pointer (current.json) is unchanged")
        listed = in_root(root, "edge-agent", "models", "list", "--json", "--config", f"/{CONFIG}")
        serving = [
            f"{r['name']}@{r['version']}" for r in json.loads(listed.stdout) if r.get("live")
        ]
        check(
            serving == [f"{PACK}@{RELEASE_VERSION}"],
            f"`edge-agent models list` shows the pushed release as the one that serves ({serving})",
        )
        result.update(after_upgrade(root, work, broker))
        result.update(old=old, new=new, outbox_rows=len(rows), ok=True)
    except (CheckFailed, subprocess.TimeoutExpired, OSError, sqlite3.Error, ValueError) as exc:
        result.update(ok=False, error=str(exc))
        print(f"upgrade_check: FAILED: {exc} (logs in {work})", file=sys.stderr)
    finally:
        broker.stop()
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
