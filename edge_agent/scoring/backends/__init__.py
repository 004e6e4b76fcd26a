"""Backends, found by name through an explicit registry and imported lazily.

A device without llama-cpp-python installed never imports it; asking for a
backend whose runtime is missing raises ``BackendUnavailable`` with the fix.
"""

from __future__ import annotations

import importlib

from edge_agent.errors import BackendUnavailable
from edge_agent.scoring.backends.base import Backend, BackendOptions, BackendOutput

__all__ = ["REGISTRY", "Backend", "BackendOptions", "BackendOutput", "create"]

#: backend name -> "module:Class"; the only place a backend is named.
REGISTRY: dict[str, str] = {
    "onnx": "edge_agent.scoring.backends.onnx:OnnxBackend",
    "fake": "edge_agent.scoring.backends.fake:FakeBackend",
    "llama_cpp": "edge_agent.scoring.backends.llama_cpp:LlamaCppBackend",
}

#: What to install when a backend's runtime is missing.
_INSTALL_HINT: dict[str, str] = {
    "onnx": "pip install onnxruntime",
    "llama_cpp": "pip install 'edge-agent[llm]'",
}


def create(name: str) -> Backend:
    """Instantiate the backend registered under ``name``."""
    target = REGISTRY.get(name)
    if target is None:
        known = ", ".join(sorted(REGISTRY))
        raise BackendUnavailable(f"unknown backend {name!r} (known: {known})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _INSTALL_HINT.get(name, "")
        raise BackendUnavailable(
            f"backend {name!r} needs a runtime that is not installed ({exc.name})"
            + (f": {hint}" if hint else "")
        ) from exc
    cls = getattr(module, class_name)
    backend: Backend = cls()
    return backend
