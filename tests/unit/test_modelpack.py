from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_agent.errors import ModelIntegrityError, ModelPackError
from edge_agent.models.pack import discover, open_pack, resolve
from tests.conftest import MODELS


def test_fake_pack_verifies(fake_pack: Path) -> None:
    pack = open_pack(fake_pack)
    pack.verify()
    assert pack.verified
    assert pack.ref == "fake-pack@0.0.1"


def test_flipped_byte_is_refused_naming_the_file(fake_pack: Path) -> None:
    target = fake_pack / "weights.bin"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError) as err:
        open_pack(fake_pack).verify()
    assert str(target) in str(err.value)
    assert "sha256" in str(err.value)


def test_missing_and_resized_files_are_refused(fake_pack: Path) -> None:
    target = fake_pack / "weights.bin"
    target.write_bytes(target.read_bytes() + b"x")
    with pytest.raises(ModelIntegrityError, match="size"):
        open_pack(fake_pack).verify()
    target.unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        open_pack(fake_pack).verify()


def test_manifest_with_unknown_key_is_refused(fake_pack: Path) -> None:
    manifest = fake_pack / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("[routing]", "[routing]\nthreshhold = 1"))
    with pytest.raises(ModelPackError, match="threshhold"):
        open_pack(fake_pack)


def test_not_a_pack(tmp_path: Path) -> None:
    with pytest.raises(ModelPackError, match="no manifest"):
        open_pack(tmp_path)


def test_bundled_packs_verify_and_one_is_default() -> None:
    packs = discover()
    names = {p.manifest.name for p in packs}
    assert {"basicmotions-int8", "basicmotions-fp32", "basicmotions-cloud"} <= names
    for pack in packs:
        pack.verify()
    assert resolve().manifest.name == "basicmotions-int8"
    assert resolve("basicmotions-fp32").manifest.backend == "onnx"


def test_bundled_pack_flipped_byte_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "pack"
    shutil.copytree(MODELS / "basicmotions-int8", copy)
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx"):
        open_pack(copy).verify()


def test_resolve_unknown_name_lists_what_exists() -> None:
    with pytest.raises(ModelPackError, match="basicmotions-int8"):
        resolve("no-such-pack")
