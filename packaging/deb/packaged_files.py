"""Derive the Debian package's unit and configuration from the ones in systemd/.

    python packaging/deb/packaged_files.py unit   systemd/edge-agent.service   OUT
    python packaging/deb/packaged_files.py config systemd/agent.toml.example   OUT

systemd/ describes an install from a git checkout (the venv in /opt/edge-agent/.venv, a
transient user per start). The package installs a venv in /usr/lib/edge-agent with
/usr/bin/edge-agent, and a system user ``edge-agent`` that owns /var/lib/edge-agent across
upgrades. Everything else — every hardening line, every comment on it — stays as written
there, so the two cannot drift apart. Each change must apply exactly once, or this fails.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

UNIT_HEADER = """\
# edge-agent: the on-device service (score readings, act locally, send hard cases over MQTT).
#
# Installed by the edge-agent Debian package (made from systemd/edge-agent.service of the
# source tree by packaging/deb/packaged_files.py). The package enables this unit but does not
# start it: edit /etc/edge-agent/agent.toml, then `systemctl start edge-agent` (it also starts
# at the next boot). An upgrade restarts it if it was running. See
# /usr/share/doc/edge-agent/README.Debian.
# Put local changes in a drop-in (systemctl edit edge-agent), not in this file.

"""

#: (pattern, replacement) applied to the unit below its header, each exactly once.
UNIT_EDITS: list[tuple[str, str]] = [
    (
        r"(?m)^Documentation=.*$",
        "Documentation=file:///usr/share/doc/edge-agent/README.Debian",
    ),
    (
        r"(?m)^# /opt/edge-agent/\.venv is where scripts/setup.*\n# checked out at .*\n",
        "# /usr/bin/edge-agent runs the package's own venv in /usr/lib/edge-agent.\n",
    ),
    (
        r"(?m)^ExecStart=/opt/edge-agent/\.venv/bin/edge-agent ",
        "ExecStart=/usr/bin/edge-agent ",
    ),
    (r"Owned by the dynamic user;", "Owned by the edge-agent user;"),
    (
        r"(?m)^# A fresh unprivileged UID/GID for every start; implies .*\n# .*\nDynamicUser=yes\n",
        "# The package's system user (created by its postinst), so that the state folder keeps\n"
        "# its owner across upgrades. What DynamicUser= would imply is set explicitly here:\n"
        "# ProtectSystem=strict, ProtectHome=yes, PrivateTmp=yes, RemoveIPC=yes,\n"
        "# NoNewPrivileges=yes and RestrictSUIDSGID=yes, all below.\n"
        "User=edge-agent\nGroup=edge-agent\n",
    ),
]

CONFIG_EDITS: list[tuple[str, str]] = [
    (
        r"(?m)^# edge-agent device configuration: copy to /etc/edge-agent/agent.toml and edit\.$",
        "# edge-agent device configuration (a conffile of the Debian package: your edits are kept\n"
        "# on upgrade; `dpkg --purge` removes it).",
    ),
    (
        r'(?m)^#packs_dir = ".*"\n',
        "\\g<0>"
        "# The model store: large pack files that `edge-agent models fetch` adds (the LLM's\n"
        "# GGUF). In the state folder, which the service owns; run the fetch as root or\n"
        "# edge-agent, with --config /etc/edge-agent/agent.toml.\n"
        'store_dir = "/var/lib/edge-agent/store"\n',
    ),
]


def apply(text: str, edits: list[tuple[str, str]], what: str) -> str:
    for pattern, replacement in edits:
        text, n = re.subn(pattern, replacement, text)
        if n != 1:
            raise SystemExit(f"packaged_files: {what}: {pattern!r} matched {n} times, not once")
    return text


def unit(source: str) -> str:
    body = source[source.index("[Unit]") :]
    return UNIT_HEADER + apply(body, UNIT_EDITS, "unit")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("unit", "config"):
        sys.stderr.write(__doc__ or "")
        return 2
    kind, source, out = argv[0], Path(argv[1]), Path(argv[2])
    text = source.read_text(encoding="utf-8")
    result = unit(text) if kind == "unit" else apply(text, CONFIG_EDITS, "config")
    out.write_text(result, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
