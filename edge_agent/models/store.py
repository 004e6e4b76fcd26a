"""The device's model store under ``<state_dir>/models``: installed packs and the pointer.

::

    incoming/<release id>/      files of a release being received (the only place written to
                                from outside; names checked, sizes capped)
    packs/<name>-<version>-<id>/ verified releases, never changed once there
    current.json                the pointer: which installed pack serves, the previous one,
                                whether the live one is still on probation, the committed
                                version per pack name

The pointer is replaced whole (``util.files.atomic_write``, folder synced), so at any instant —
a SIGKILL included — it names exactly one pack (or none: the configured ``model.pack``
serves), and a pack is only ever named once it is completely in ``packs/``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import msgspec

from edge_agent.errors import ModelError, ReleaseError
from edge_agent.models.pack import ModelPack, open_pack
from edge_agent.models.release import VerifiedRelease, check_name, version_key
from edge_agent.util.files import Durability, atomic_write, fsync_dir

log = logging.getLogger(__name__)

POINTER = "current.json"


class Pointer(msgspec.Struct, forbid_unknown_fields=True):
    v: int = 1
    live: str | None = None  #: folder under packs/ that serves; None: the configured pack
    previous: str | None = None  #: what served before ``live`` (None: the configured pack)
    probation: bool = False  #: ``live`` was promoted and its health window is not over
    baseline_hard_rate: float | None = None  #: the old model's hard rate, for the health window
    release: str = ""  #: release id of ``live``
    committed: dict[str, str] = {}  #: pack name -> last committed version


class ModelStore:
    """The device's installed packs and the pointer to the live one."""

    def __init__(self, state_dir: str | Path, store_dir: str = "") -> None:
        self.root = Path(state_dir) / "models"
        self.packs = self.root / "packs"
        self.incoming = self.root / "incoming"
        self.pointer_path = self.root / POINTER
        self.store_dir = store_dir

    def read_pointer(self) -> Pointer:
        try:
            data = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return Pointer()
        except OSError as exc:
            log.error("cannot read %s: %s; serving the configured pack", self.pointer_path, exc)
            return Pointer()
        try:
            return msgspec.json.decode(data, type=Pointer)
        except msgspec.MsgspecError as exc:
            log.error("%s is not valid (%s); serving the configured pack", self.pointer_path, exc)
            return Pointer()

    def write_pointer(self, pointer: Pointer) -> None:
        """Replace the pointer atomically and durably."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.pointer_path, msgspec.json.encode(pointer), Durability.FOLDER)

    def open_installed(self, folder: str, *, verify: bool = True) -> ModelPack:
        """An installed pack; ``verify=False`` only right after ``install``, whose release
        was verified file by file just before the rename that put it there."""
        pack = open_pack(self.packs / check_name(folder), self.store_dir)
        if verify:
            pack.verify()
        else:
            pack.verified = True
        return pack

    def live_pack(self) -> tuple[ModelPack | None, Pointer]:
        """The installed pack the pointer names, verified; None: serve the configured pack."""
        pointer = self.read_pointer()
        for folder in (pointer.live, pointer.previous):
            if folder is None:
                return None, pointer
            try:
                return self.open_installed(folder), pointer
            except (ModelError, ReleaseError) as exc:
                log.error("installed pack %s cannot serve: %s", folder, exc)
        return None, pointer

    def staging(self, release_id: str) -> Path:
        folder = self.incoming / check_name(release_id)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def install(self, verified: VerifiedRelease) -> tuple[str, bool]:
        """Move a verified staged release into packs/ (one rename); returns its folder name and
        whether it was moved there now (False: it was installed before, the copy is dropped)."""
        m = verified.pack.manifest
        name = check_name(f"{m.name}-{m.version}-{verified.id[:12]}")
        dest = self.packs / name
        self.packs.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(verified.pack.path, ignore_errors=True)
            return name, False
        for child in verified.pack.path.iterdir():  # data on disk before the rename
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(verified.pack.path, dest)
        fsync_dir(self.packs)
        return name, True

    def installed(self) -> list[tuple[str, ModelPack]]:
        """Every release installed in packs/, by folder name, manifests read (files are not
        verified: ``live_pack`` does that before one serves). A folder that is not a readable
        pack is logged and left out; an unreadable store (another user's 0700 state folder)
        lists nothing, with a warning."""
        try:
            folders = sorted(p.name for p in self.packs.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot list the installed releases in %s: %s", self.packs, exc)
            return []
        found: list[tuple[str, ModelPack]] = []
        for folder in folders:
            try:
                found.append((folder, open_pack(self.packs / folder, self.store_dir)))
            except ModelError as exc:
                log.warning("installed release %s is not a readable pack: %s", folder, exc)
        return found

    def named(self) -> set[str]:
        """The installed packs the pointer names (live and previous)."""
        p = self.read_pointer()
        return {x for x in (p.live, p.previous) if x}

    def promote(
        self,
        folder: str,
        release: str,
        pack: ModelPack,
        baseline_hard_rate: float | None,
        *,
        committed: bool,
    ) -> None:
        """``folder`` serves from now, the live one becomes the previous; on probation unless
        ``committed`` at once (an operator's signed rollback)."""
        pointer = self.read_pointer()
        pointer.previous, pointer.live = pointer.live, folder
        pointer.release = release
        pointer.probation = not committed
        pointer.baseline_hard_rate = baseline_hard_rate
        if committed:
            m = pack.manifest
            pointer.committed = {**pointer.committed, m.name: m.version}
        self.write_pointer(pointer)

    def commit(self, pack: ModelPack) -> None:
        """The live pack passed its probation: its version is the committed one."""
        pointer = self.read_pointer()
        m = pack.manifest
        pointer.probation = False
        pointer.committed = {**pointer.committed, m.name: m.version}
        self.write_pointer(pointer)

    def roll_back(self) -> None:
        """The previous pack serves again (None: the configured pack); nothing on probation."""
        pointer = self.read_pointer()
        pointer.live, pointer.previous = pointer.previous, None
        pointer.probation = False
        pointer.release = ""
        self.write_pointer(pointer)

    def tidy(self, keep: set[str]) -> None:
        """Remove installed packs that the pointer does not name."""
        if self.packs.is_dir():
            for child in self.packs.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)

    def tidy_unnamed(self) -> None:
        """At start: remove installed packs the pointer does not name (installed, then the agent
        died before promoting them). Nothing is removed while the pointer cannot be read."""
        try:
            msgspec.json.decode(self.pointer_path.read_bytes(), type=Pointer)
        except FileNotFoundError:
            pass  # never promoted: no installed pack is named
        except (OSError, msgspec.MsgspecError):
            return
        self.tidy(self.named())

    def check_upgrade(self, verified: VerifiedRelease, live: ModelPack) -> None:
        """A release may replace ``live`` only with the same input shape and, unless signed
        as a rollback, no lower version than the committed one (nor the live one again)."""
        m = verified.pack.manifest
        if tuple(m.input.shape) != tuple(live.manifest.input.shape):
            raise ReleaseError(
                f"input shape {m.input.shape} differs from the live model's"
                f" {list(live.manifest.input.shape)}"
            )
        committed = self.read_pointer().committed.get(m.name)
        if committed is None and live.manifest.name == m.name:
            committed = live.manifest.version
        if committed is None or verified.release.rollback:
            return
        if version_key(m.version) < version_key(committed):
            raise ReleaseError(
                f"version {m.version} is lower than the committed {committed}"
                " (a downgrade needs a release signed with --rollback)"
            )
        if version_key(m.version) == version_key(committed) and live.ref == f"{m.name}@{m.version}":
            raise ReleaseError(f"version {m.version} is already live")
