"""Disk usage of a directory tree, counted the way containerd does (allocated blocks)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Usage:
    size: int = 0  # bytes allocated (st_blocks * 512), hard links counted once
    inodes: int = 0


def disk_usage(root: Path) -> Usage:
    """Everything under `root` and `root` itself; symlinks are counted, never followed.

    Entries that vanish during the walk (an active snapshot in use) are skipped.
    """
    seen: set[tuple[int, int]] = set()
    size = 0

    def count(st: os.stat_result) -> None:
        nonlocal size
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512

    top = os.lstat(root)
    count(top)
    pending = [os.fspath(root)] if stat.S_ISDIR(top.st_mode) else []
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        count(entry.stat(follow_symlinks=False))
                    except FileNotFoundError:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
        except FileNotFoundError:
            continue
    return Usage(size=size, inodes=len(seen))
