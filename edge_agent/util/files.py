"""Files: the sha256 of a file, and writes that a crash cannot leave half done."""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import tomllib
from pathlib import Path
from typing import Any


class UnreadableFile(ValueError):
    """A file that exists but cannot be read or parsed; the message says why."""


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML document at ``path``. FileNotFoundError propagates (callers say what was
    missing); every other failure is an UnreadableFile whose message names the problem."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableFile(f"cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UnreadableFile(f"not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"not valid UTF-8 at byte {exc.start}") from exc
    except RecursionError as exc:
        raise UnreadableFile("not valid TOML: nested too deeply") from exc


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in blocks (raises OSError as ``open`` does)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class Durability(enum.Enum):
    """How much of an atomic write must be on disk before ``atomic_write`` returns."""

    #: Readers see the old file or the new one, never a mix; a power cut may lose the write.
    RENAME = "rename"
    #: And the new bytes are on disk before the rename (a crash leaves old or new, never empty).
    DATA = "data"
    #: And the rename itself is on disk (the folder is synced): the new file survives a power cut.
    FOLDER = "folder"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    durability: Durability = Durability.DATA,
    *,
    mode: int = 0o644,
) -> None:
    """Replace ``path`` with ``data`` through a temporary file in the same folder and a rename.

    The temporary file (``.<name>.<pid>.tmp``) is removed when anything fails.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durability is not Durability.RENAME:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durability is Durability.FOLDER:
        fsync_dir(target.parent)
