"""A small loopback HTTP proxy in front of the real endpoint that injects faults on request.

Modes (``proxy.mode``, changeable while running): ``pass`` forwards to the upstream;
``429`` answers 429 with ``Retry-After: <retry_after>``; ``500`` answers 500; ``stall``
holds the request for ``stall_s`` without answering; ``garbage`` forwards, then replaces the
answer's text with ``garbage_text`` (usage kept: the tokens were spent); ``not_json`` answers
200 with a body that is not JSON. ``times`` > 0 applies the fault to that many requests only,
then passes. ``requests`` counts what arrived. ``stop()`` closes the port (endpoint down).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.devtools.localbroker import free_port


class FaultProxy:
    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.mode = "pass"
        self.times = 0
        self.retry_after = "1"
        self.stall_s = 30.0
        self.garbage_text = "It looks like someone running, maybe walking"
        self.requests = 0
        self.faults = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._release = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set(self, mode: str, times: int = 0, **kw: Any) -> None:
        with self._lock:
            self.mode, self.times = mode, times
            for k, v in kw.items():
                setattr(self, k, v)

    def _take(self) -> str:
        with self._lock:
            self.requests += 1
            mode = self.mode
            if mode != "pass":
                self.faults += 1
                if self.times > 0:
                    self.times -= 1
                    if self.times == 0:
                        self.mode = "pass"
            return mode

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward(b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                mode = proxy._take()
                if mode == "429":
                    self._send(429, b'{"error":"slow down"}', {"Retry-After": proxy.retry_after})
                elif mode == "500":
                    self._send(500, b'{"error":"boom"}', {"Content-Type": "application/json"})
                elif mode == "stall":
                    proxy._release.wait(proxy.stall_s)
                    self._send(503, b"", {})
                elif mode == "not_json":
                    self._send(200, b"<html>gateway</html>", {"Content-Type": "text/html"})
                else:
                    self._forward(body, garbage=mode == "garbage")

            def _forward(self, body: bytes, garbage: bool = False) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host"}}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                except OSError:
                    self._send(502, b"", {})
                    return
                finally:
                    conn.close()
                if garbage and status == 200:
                    doc = json.loads(data)
                    for choice in doc["choices"]:
                        if "message" in choice:
                            choice["message"]["content"] = proxy.garbage_text
                        else:
                            choice["text"] = proxy.garbage_text
                    data = json.dumps(doc).encode()
                self._send(status, data, {"Content-Type": "application/json"})

        self._release.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        time.sleep(0.01)
