"""The layout rules of docs/architecture.md, read from the imports of every module.

Each folder ("room") of ``edge_agent`` may import only the rooms listed for it below — the
data flow runs one way, from the foundation up to the services — and a few rules hold on
top: nothing imports the CLI, the device never imports the cloud side or the operator tools,
a model (``models/``, ``scoring/``) knows nothing of MQTT, and optional runtimes are imported
by the one module that wraps each. Imports inside functions and under ``TYPE_CHECKING``
count like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "edge_agent"

FOUNDATION = {"errors", "config", "util"}
#: room -> the rooms it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "util": {"errors"},
    "config": {"errors", "util"},
    "wire": FOUNDATION,
    "models": FOUNDATION,
    "mqtt": FOUNDATION | {"wire"},
    "ingest": FOUNDATION | {"wire", "mqtt"},
    "scoring": FOUNDATION | {"ingest", "models"},
    "routing": FOUNDATION | {"wire", "scoring"},
    "delivery": FOUNDATION | {"wire", "mqtt"},
    "rollout": FOUNDATION | {"wire", "mqtt", "ingest", "scoring", "models"},
    "service": FOUNDATION
    | {"wire", "mqtt", "ingest", "scoring", "routing", "delivery", "models", "rollout"},
    "cloud": FOUNDATION | {"wire", "mqtt", "ingest", "scoring", "models"},
    "devtools": FOUNDATION
    | {"__init__", "wire", "mqtt", "ingest", "scoring", "routing", "delivery", "models"}
    | {"rollout", "service", "cloud"},
    # The composition root: it wires everything (the cloud and the tools lazily, per command).
    "cli": set(),  # filled in below: everything but itself
    "__main__": {"cli"},
    "__init__": set(),
}
ROOMS = set(ALLOWED)
ALLOWED["cli"] = ROOMS - {"cli", "__main__"}
#: What the device runs; it never imports the cloud side or the operator tools.
DEVICE = ROOMS - {"cloud", "devtools", "cli", "__main__"}
#: Third-party packages that only some rooms may import: package -> allowed module paths.
CONFINED = {
    "paho": ("mqtt/", "delivery/", "cloud/", "rollout/", "ingest/sources/mqtt.py", "devtools/"),
    "llama_cpp": ("scoring/backends/llama_cpp.py",),
    "onnxruntime": ("scoring/backends/onnx.py",),
    "httpx": ("cloud/endpoint.py",),
    "psutil": ("service/telemetry.py",),
}


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def _module(path: Path) -> list[str]:
    parts = ["edge_agent", *path.relative_to(PACKAGE).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(path: Path, package: list[str] | None = None) -> list[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names
    (``package``: the package ``path`` is in; by default found from its place in PACKAGE)."""
    if package is None:
        package = _module(path) if path.name == "__init__.py" else _module(path)[:-1]
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.append(module)
            # `from edge_agent.x import y` may name a module y: count it as one.
            found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def edges() -> list[tuple[Path, str]]:
    """(module file, the room of an edge_agent module it imports), each pair once."""
    out: list[tuple[Path, str]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] != "edge_agent":
                continue
            target = parts[1] if len(parts) > 1 else "__init__"
            if (target in ROOMS or (PACKAGE / f"{target}.py").exists()) and (
                path,
                target,
            ) not in out:
                out.append((path, target))
    return out


def test_every_module_lives_in_a_known_room() -> None:
    unknown = {_room(p) for p in PACKAGE.rglob("*.py")} - ROOMS
    assert not unknown, f"rooms without import rules: {sorted(unknown)}"


def test_each_room_imports_only_the_rooms_below_it() -> None:
    wrong = [
        f"{p.relative_to(PACKAGE)} imports {target}/"
        for p, target in edges()
        if target != _room(p) and target not in ALLOWED[_room(p)]
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_cli_and_the_device_never_imports_cloud_or_tools() -> None:
    wrong = [
        f"{p.relative_to(PACKAGE)} imports {target}"
        for p, target in edges()
        if (target == "cli" and _room(p) != "__main__")
        or (_room(p) in DEVICE and target in {"cloud", "devtools"})
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(CONFINED))
def test_optional_and_io_libraries_stay_in_their_modules(package: str) -> None:
    allowed = CONFINED[package]
    wrong = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if any(name.split(".")[0] == package for name in imports(p))
        and not str(p.relative_to(PACKAGE)).startswith(allowed)
    ]
    assert not wrong, f"{package} imported outside {allowed}: {wrong}"


def test_the_import_reader_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """The reader itself: an import inside a function, under TYPE_CHECKING, or relative."""
    module = PACKAGE / "scoring" / "scorer.py"
    found = imports(module)
    assert "edge_agent.models.pack" in found
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .. import wire\n"
        "if TYPE_CHECKING:\n    from edge_agent.cloud import worker\n"
        "def f():\n    import paho.mqtt.client\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(source, encoding="utf-8")
    got = imports(probe, ["edge_agent", "scoring"])
    assert {"edge_agent.wire", "edge_agent.cloud", "paho.mqtt.client"} <= set(got)


def test_no_module_is_over_500_lines_and_no_function_over_80() -> None:
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 550:  # ~500: a docstring's worth of slack
            long_modules.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 80:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.name}: {n}")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
