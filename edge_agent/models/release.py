"""Signed model releases: what an operator signs and what a device checks before it stages one.

A release is a model pack folder plus two files the operator's tools write:

``release.json``
    The signed statement: pack name and version, the sha256 of ``manifest.toml``, every file
    of the pack with its size and sha256, and ``rollback = true`` for a release an operator
    signs on purpose to go back to a lower version.
``release.sig``
    The Ed25519 signature of the exact bytes of ``release.json``, base64.

``verify_release`` accepts a folder only if the signature verifies with one of the device's
trusted public keys, the manifest and every file match the statement (size and sha256), no
file is larger than allowed, every name is a plain file name, and the manifest says the same
name and version. The release id is the first 32 hex digits of the sha256 of ``release.json``:
the same release always has the same id, so a command repeated for it is recognised.

Keys: ``edge-agent models keygen`` writes a private key (PEM, mode 0600, keep it off devices)
and its public key (PEM); devices trust the public keys in ``rollout.trusted_keys_dir``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from packaging.version import InvalidVersion, Version

from edge_agent.errors import ModelError, ReleaseError, ReleaseFilesError
from edge_agent.models.pack import MANIFEST, ModelPack, open_pack
from edge_agent.util.files import file_sha256

RELEASE = "release.json"
SIGNATURE = "release.sig"
#: release.json and release.sig are small; anything bigger is refused before parsing.
MAX_STATEMENT_BYTES = 256 * 1024
#: A plain file name: no folders, no "..", no hidden files.
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class ReleaseFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str
    sha256: _Sha256
    size: Annotated[int, msgspec.Meta(ge=0)]


class Release(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The signed statement (``release.json``)."""

    v: int
    name: str
    version: str
    manifest_sha256: _Sha256
    manifest_size: Annotated[int, msgspec.Meta(ge=1)]
    files: list[ReleaseFile]
    rollback: bool = False
    notes: str = ""

    def names(self) -> list[str]:
        """Every file the release consists of, the manifest first."""
        return list(self.sizes())

    def sizes(self) -> dict[str, int]:
        """Size of every file the release consists of, by name, the manifest first."""
        return {MANIFEST: self.manifest_size, **{f.path: f.size for f in self.files}}


@dataclass(frozen=True, slots=True)
class VerifiedRelease:
    id: str
    release: Release
    pack: ModelPack


def version_key(version: str) -> Version:
    """A release version for ordering (PEP 440, ``packaging.version``: ``1.10.2 > 1.9``,
    ``1.0.0rc1 < 1.0.0``); ReleaseError when it is not one."""
    try:
        return Version(version)
    except InvalidVersion as exc:
        raise ReleaseError(f"version {version!r} is not a PEP 440 version") from exc


def release_id(statement: bytes) -> str:
    return hashlib.sha256(statement).hexdigest()[:32]


def check_name(name: str) -> str:
    if not NAME.match(name) or name in (".", ".."):
        raise ReleaseError(f"file name {name!r:.80} is not a plain file name")
    return name


# -- keys ------------------------------------------------------------------------------


def keygen(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair (PEM). The private key file is created with mode 0600
    and never overwritten."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ReleaseError(f"{private_path} exists; not overwriting a key") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ReleaseError(f"{path}: not a readable unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"{path}: not a readable PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{path}: not an Ed25519 public key")
    return key


def trusted_keys(folder: Path) -> list[tuple[str, Ed25519PublicKey]]:
    """The public keys a device trusts: ``*.pub`` in ``folder`` and, under systemd,
    ``$CREDENTIALS_DIRECTORY/release-key.pub``."""
    paths = sorted(folder.glob("*.pub")) if folder.is_dir() else []
    cred = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred and (Path(cred) / "release-key.pub").is_file():
        paths.append(Path(cred) / "release-key.pub")
    return [(p.name, load_public_key(p)) for p in paths]


# -- signing (operator side) -------------------------------------------------------------


def _verified_pack(folder: Path, what: str) -> ModelPack:
    """The pack in ``folder`` with every file checked; a ReleaseError saying ``what`` else."""
    try:
        pack = open_pack(folder)
        pack.verify()
    except ModelError as exc:
        raise ReleaseError(f"{what}: {exc}") from exc
    return pack


def sign_pack(folder: Path, key: Ed25519PrivateKey, *, rollback: bool = False) -> str:
    """Verify the pack, write ``release.json`` and ``release.sig`` into it; return the id."""
    pack = _verified_pack(folder, f"{folder}: not a valid pack")
    m = pack.manifest
    if any(f.store for f in m.files):
        raise ReleaseError(
            f"{folder}: files in the model store cannot be released; put them in the pack folder"
        )
    manifest = folder / MANIFEST
    statement = Release(
        v=1,
        name=m.name,
        version=m.version,
        manifest_sha256=file_sha256(manifest),
        manifest_size=manifest.stat().st_size,
        files=[ReleaseFile(check_name(f.path), f.sha256, f.size) for f in m.files],
        rollback=rollback,
    )
    body = msgspec.json.format(msgspec.json.encode(statement), indent=2) + b"\n"
    (folder / RELEASE).write_bytes(body)
    (folder / SIGNATURE).write_bytes(base64.b64encode(key.sign(body)) + b"\n")
    return release_id(body)


# -- verifying (device side) -------------------------------------------------------------


def _read_small(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_STATEMENT_BYTES:
            raise ReleaseError(f"{path}: {size} bytes, larger than a release statement can be")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ReleaseError(f"{path}: missing (the release is not signed)") from exc
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL byte in a path from a command
        raise ReleaseError(f"{str(path)!r:.200}: not a usable path: {exc}") from exc


def read_statement(
    folder: Path, keys: list[tuple[str, Ed25519PublicKey]]
) -> tuple[str, Release, str]:
    """Check the signature of ``folder``'s statement; return (release id, statement, key name)."""
    if not keys:
        raise ReleaseError("no trusted release key on this device (rollout.trusted_keys_dir)")
    body = _read_small(folder / RELEASE)
    rid = release_id(body)  # of the bytes as sent: a refusal names what it refused
    try:
        signature = base64.b64decode(_read_small(folder / SIGNATURE).strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ReleaseError(f"{folder / SIGNATURE}: not base64", release=rid) from exc
    signer = ""
    for name, key in keys:
        try:
            key.verify(signature, body)
        except InvalidSignature:
            continue
        signer = name
        break
    if not signer:
        raise ReleaseError(
            "the release signature does not verify with any trusted key", release=rid
        )
    try:
        statement = msgspec.json.decode(body, type=Release)
    except msgspec.MsgspecError as exc:
        raise ReleaseError(f"{folder / RELEASE}: {exc}", release=rid) from exc
    if statement.v != 1:
        raise ReleaseError(
            f"{folder / RELEASE}: statement version {statement.v} not supported", release=rid
        )
    for name in statement.names():
        try:
            check_name(name)
        except ReleaseError as exc:
            raise ReleaseError(str(exc), release=rid) from None
    return rid, statement, signer


def check_files(folder: Path, statement: Release, max_file_bytes: int) -> None:
    """Every file of the statement is in ``folder`` with its size and sha256."""
    wanted = [(MANIFEST, statement.manifest_sha256, statement.manifest_size)]
    wanted += [(f.path, f.sha256, f.size) for f in statement.files]
    for name, sha, size in wanted:
        if size > max_file_bytes:
            raise ReleaseError(f"{name}: {size} bytes, over rollout.max_file_bytes")
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError as exc:
            raise ReleaseFilesError(f"{name}: missing from the release") from exc
        if actual != size:
            raise ReleaseFilesError(f"{name}: {actual} bytes, the signed statement says {size}")
        if file_sha256(path) != sha:
            raise ReleaseFilesError(f"{name}: sha256 does not match the signed statement")


def verify_release(
    folder: Path,
    keys: list[tuple[str, Ed25519PublicKey]],
    *,
    max_file_bytes: int,
    max_files: int = 32,
) -> VerifiedRelease:
    """Signature, statement, files, manifest: everything a device checks before staging."""
    rid, statement, _ = read_statement(folder, keys)
    if len(statement.files) > max_files:
        raise ReleaseError(f"{len(statement.files)} files, over rollout.max_files")
    check_files(folder, statement, max_file_bytes)
    pack = _verified_pack(folder, "the released pack is not valid")
    m = pack.manifest
    if (m.name, m.version) != (statement.name, statement.version):
        raise ReleaseError(
            f"the manifest says {m.name}@{m.version}, the statement {statement.name}@"
            f"{statement.version}"
        )
    listed = {(f.path, f.sha256, f.size) for f in m.files}
    signed = {(f.path, f.sha256, f.size) for f in statement.files}
    if listed != signed or any(f.store for f in m.files):
        raise ReleaseError("the manifest's files differ from the signed statement's")
    version_key(m.version)
    return VerifiedRelease(rid, statement, pack)
