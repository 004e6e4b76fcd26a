"""llama-cpp-python's OpenAI-compatible server on a free loopback port, for the endpoint tests.

The real server (``scripts/llama_server.py``: ``python -m llama_cpp.server`` with llama.cpp's
extra weight buffers off) serving the SmolLM2 GGUF from the model store, with a small context
and two threads; stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from edge_agent.devtools.localbroker import free_port
from edge_agent.models.fetch import source_file
from edge_agent.models.pack import open_pack
from tests.conftest import MODELS, ROOT

LLM_PACK = MODELS / "smollm2-basicmotions"
MODEL_ALIAS = "smollm2"
API_KEY = "test-key-not-secret"


def gguf_path() -> Path:
    """The verified GGUF of the LLM pack (the tests fail, saying how to fetch it, without it).

    The original the pack's file was requantized from (SmolLM2's Q4_1, kept in the store by
    ``models fetch``): the endpoint tests ask the model to repeat a word, and that 135M model's
    Q4_1 does so for "walking" where its Q4_0 starts a sentence instead.
    """
    pack = open_pack(LLM_PACK)
    pack.verify()
    original = source_file(pack)
    if original is not None:
        return original
    entry = next(f for f in pack.manifest.files if f.store)
    return pack.location(entry)


class LlamaServer:
    def __init__(self, log_dir: Path, port: int = 0) -> None:
        self.port = port or free_port()
        self.log_path = log_dir / f"llama-server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> LlamaServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "scripts" / "llama_server.py"),
                    "--model",
                    str(gguf_path()),
                    "--model_alias",
                    MODEL_ALIAS,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--n_ctx",
                    "512",
                    "--n_threads",
                    "2",
                    "--n_threads_batch",
                    "2",
                    "--api_key",
                    API_KEY,
                    "--verbose",
                    "False",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama server exited: {self.log_path.read_text()[-2000:]}")
            try:
                r = httpx.get(f"{self.base_url}/models", headers=headers, timeout=1.0)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("llama server did not become ready")
        # Warm-up: the first completion pays for graph set-up.
        httpx.post(
            f"{self.base_url}/chat/completions",
            headers=headers,
            json={
                "model": MODEL_ALIAS,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
            timeout=timeout,
        ).raise_for_status()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
