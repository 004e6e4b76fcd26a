"""`edge-agent score` and `edge-agent models`, run as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODELS, ONNX_CROSS_BUILD_TOLERANCE, TEST_JSONL, assert_accuracy_within

pytestmark = pytest.mark.integration


def run(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_score_reproduces_manifest_accuracy() -> None:
    proc = run("score", str(TEST_JSONL))
    assert proc.returncode == 0, proc.stderr
    outputs = [json.loads(x) for x in proc.stdout.splitlines()]
    truth = [json.loads(x) for x in TEST_JSONL.read_text().splitlines()]
    assert [o["id"] for o in outputs] == [t["id"] for t in truth]
    manifest = (MODELS / "basicmotions-int8" / "manifest.toml").read_text()
    expected = float(manifest.split("accuracy_test = ")[1].split()[0])
    assert_accuracy_within(
        [o["label"] for o in outputs],
        [o["confidence"] for o in outputs],
        [t["label"] for t in truth],
        expected,
        ONNX_CROSS_BUILD_TOLERANCE,
    )
    for o in outputs:
        assert set(o) == {"id", "label", "confidence", "route", "reason", "model", "latency_ms"}
        assert o["route"] in ("local", "hard")
        assert o["model"].startswith("basicmotions-int8@")
        assert 0 < o["confidence"] <= 1
        assert o["latency_ms"] >= 0
    assert b"scored 40 of 40 lines" in proc.stderr


def test_every_bad_line_gets_an_error_and_order_is_kept() -> None:
    good = TEST_JSONL.read_text().splitlines()[:3]
    window = json.loads(good[0])["values"]
    bad_shape = json.dumps({"id": "shape", "values": window[:5]})
    nan = json.dumps({"id": "nan", "values": window}).replace(str(window[2][7]), "NaN", 1)
    strings = json.dumps({"id": "str", "values": [[str(v) for v in row] for row in window]})
    lines = [
        good[0].encode(),
        b"",
        b"{not json",
        b'{"id": "utf8", "values": "\xff\xfe"}',
        bad_shape.encode(),
        good[1].encode(),
        nan.encode(),
        strings.encode(),
        b"   ",
        b'{"id": "big", "values": [' + b"1.0," * 400_000 + b"1.0]}",
        b"[]",
        good[2].encode(),
    ]
    proc = run("score", "-", stdin=b"\n".join(lines) + b"\n")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(out) == 10  # one per non-blank line
    codes = [o["error"]["code"] if "error" in o else None for o in out]
    assert codes == [
        None,
        "malformed_json",
        "invalid_utf8",
        "wrong_shape",
        None,
        "non_finite",
        "wrong_type",
        "too_large",
        "not_an_object",
        None,
    ]
    assert [o.get("id") for o in out if "error" in o] == [
        None,
        "utf8",  # the bad bytes are in 'values'; the id itself is readable
        "shape",
        "nan",
        "str",
        None,
        None,
    ]
    assert out[0]["id"] == json.loads(good[0])["id"]
    assert out[9]["id"] == json.loads(good[2])["id"]
    assert b"7 rejected" in proc.stderr


def test_models_list_json() -> None:
    proc = run("models", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    packs = {p["name"]: p for p in json.loads(proc.stdout)}
    assert packs["basicmotions-int8"]["default"] is True
    assert packs["basicmotions-fp32"]["default"] is False
    for p in packs.values():
        assert {"name", "version", "backend", "default", "files"} <= set(p)
        assert all(Path(f).is_absolute() and Path(f).is_file() for f in p["files"])


def test_models_verify_and_tampered_pack(tmp_path: Path) -> None:
    assert run("models", "verify").returncode == 0
    shutil.copytree(MODELS / "basicmotions-int8", tmp_path / "basicmotions-int8")
    model = tmp_path / "basicmotions-int8" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 0x01
    model.write_bytes(bytes(data))
    env = {"EDGE_AGENT_MODEL_PACKS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = run("models", "verify", env=env)
    assert proc.returncode == 1
    assert b"model.onnx" in proc.stdout
    proc = run("score", "-", stdin=TEST_JSONL.read_bytes()[:100], env=env)
    assert proc.returncode == 1
    assert b"sha256" in proc.stderr
    assert proc.stdout == b""


def test_config_error_is_clear(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[model]\nmax_batchh = 3\n")
    proc = run("--config", str(cfg), "score", "-")
    assert proc.returncode == 2
    assert b"model.max_batchh" in proc.stderr
