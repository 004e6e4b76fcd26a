"""Debian's Prometheus tools for the tests: ``promtool`` and a real Prometheus server (and
node_exporter for the agent's textfile), each started on a free loopback port with a
generated config and its own storage folder, and stopped by its PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.broker import free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
INSTALL = "apt-get install -y prometheus prometheus-node-exporter (scripts/setup --dev does it)"


def tool(name: str) -> str:
    """The path of a Prometheus executable, or an error saying how to install it."""
    for candidate in (shutil.which(name), f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"{name} is not installed: {INSTALL}")


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` over an exposition (exit 0 and no output: clean)."""
    return subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout} s: {log.read_text()[-2000:]}")


class _Process:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = folder / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], ready_path: str) -> None:
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=err, stderr=err, cwd=self.folder)
        _wait_http(f"http://127.0.0.1:{self.port}{ready_path}", self.proc, self.log, 30)

    def stop(self) -> None:
        """SIGTERM to our own PID, SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class NodeExporter(_Process):
    """node_exporter with only its textfile collector, reading ``textfile_dir``."""

    def start(self, textfile_dir: Path) -> NodeExporter:
        self._spawn(
            [
                tool("prometheus-node-exporter"),
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={textfile_dir}",
            ],
            "/metrics",
        )
        return self


class Prometheus(_Process):
    """A Prometheus server scraping ``jobs`` (job name -> list of host:port) every
    ``interval_s``, with ``rule_files``; its data in a folder of its own."""

    def start(
        self, jobs: dict[str, list[str]], rule_files: list[Path], interval_s: float = 1.0
    ) -> Prometheus:
        config = {
            "global": {
                "scrape_interval": f"{round(interval_s * 1000)}ms",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in jobs.items()
            ],
        }
        cfg = self.folder / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        self._spawn(
            [
                tool("prometheus"),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            "/-/ready",
        )
        return self

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (a scalar comes back as one unlabelled sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> dict[str, str]:
        """Scrape URL -> health of every active target."""
        data = self.api("targets")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}
