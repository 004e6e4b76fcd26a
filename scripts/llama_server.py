"""llama-cpp-python's OpenAI-compatible server, with llama.cpp's extra weight buffers off.

Usage: the arguments of ``python -m llama_cpp.server`` (``--model``, ``--host``, ``--port``,
``--n_ctx``, ``--n_threads``, ``--model_alias``, ``--api_key``, ...), e.g.

    .venv/bin/python scripts/llama_server.py --model <gguf> --host 127.0.0.1 --port 8000

This is the unmodified server (``llama_cpp.server.__main__.main``) with one difference: models
load with ``use_extra_bufts = False``, as the llama.cpp backend's packs do by default
(``[llama].extra_buffers``). On CPUs with AMX the extra (repacking) buffer types crash llama.cpp
on multi-token batches (ggml-org/llama.cpp#20824) — with them on, the plain server segfaults on
its first completion on the development machine — and the server has no flag for it.
"""

from __future__ import annotations

import llama_cpp
import llama_cpp.llama
from llama_cpp.server.__main__ import main

_default_params = llama_cpp.llama_model_default_params


def _params_without_extra_buffers() -> llama_cpp.llama_model_params:
    params = _default_params()
    params.use_extra_bufts = False
    return params


llama_cpp.llama.llama_cpp.llama_model_default_params = _params_without_extra_buffers

if __name__ == "__main__":
    main()
