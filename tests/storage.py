"""Storage faults the tests prepare themselves: a folder that is read-only for the agent."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def read_only_dir(folder: Path) -> Iterator[str]:
    """Make ``folder`` (which exists) read-only for this process while the block runs; yields
    how. As root (who ignores permission bits) it becomes a read-only bind mount of itself,
    which is what a file system remounted read-only looks like to SQLite; a user without
    the right to mount gets the folder's write permission taken away, which that user
    cannot ignore. Undone at the end either way."""
    if os.geteuid() == 0:
        bind = ["mount", "--bind", str(folder), str(folder)]
        remount = ["mount", "-o", "remount,bind,ro", str(folder)]
        subprocess.run(bind, check=True, capture_output=True)
        try:
            subprocess.run(remount, check=True, capture_output=True)
            yield "read-only bind mount"
        finally:
            if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], check=False)
        return
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        yield "no write permission"
    finally:
        folder.chmod(mode)
