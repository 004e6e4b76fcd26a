"""Print the requirements the aarch64 check installs, one per line, read from pyproject.toml.

The runtime dependencies (``[project].dependencies``), ``pip`` (``edge-agent models fetch``
runs ``python -m pip download``, and a device's venv has it), and the test tools the unit tests
import (``pytest`` and ``hypothesis`` from the ``dev`` extra). Lint and type tools are left out:
they never run on a device. Used by scripts/arm_check.sh; run with the native Python.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

TEST_TOOLS = ("pytest", "hypothesis")
RUNTIME_TOOLS = ("pip",)


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    return match.group(0).lower().replace("_", "-") if match else ""


def main(argv: list[str]) -> int:
    pyproject = Path(argv[1]) if len(argv) > 1 else Path("pyproject.toml")
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project.get("dependencies", []))
    dev = project.get("optional-dependencies", {}).get("dev", [])
    wanted += [r for r in dev if _name(r) in TEST_TOOLS]
    missing = [t for t in (*RUNTIME_TOOLS, *TEST_TOOLS) if t not in {_name(r) for r in wanted}]
    wanted += missing
    sys.stdout.write("".join(f"{r}\n" for r in wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
