"""What the snapshotter checks before it opens its root, each failure with its fix.

containerd's overlay snapshotter finds such problems when a container first mounts; ours
refuses to start instead, naming the setting or the command that fixes it:

- the kernel must offer overlayfs (every snapshot with a parent is an overlay mount);
- the root must not itself be on overlayfs: an overlay's upper and work directories cannot
  live there (a snapshotter run inside a container with its root on the container's own
  file system).
"""

from __future__ import annotations

import os
from pathlib import Path

from apull_node.service.mount_syscalls import MountEntry, read_mountinfo

FILESYSTEMS = "/proc/filesystems"


def _existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (the root may not be created yet)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_of(path: Path, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount that holds `path`: the topmost at the longest mountpoint above it."""
    real = os.path.realpath(_existing(path))
    best: MountEntry | None = None
    for entry in read_mountinfo() if entries is None else entries:
        point = entry.mountpoint
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        # A later entry at the same mountpoint is mounted on top: >= keeps the topmost.
        if inside and (best is None or len(point) >= len(best.mountpoint)):
            best = entry
    return best


def problems(root: Path, filesystems: str = FILESYSTEMS) -> list[str]:
    """Why the snapshotter cannot serve from `root` on this node, each with its fix."""
    found = []
    with open(filesystems) as stream:
        known = {line.split()[-1] for line in stream if line.strip()}
    if "overlay" not in known:
        found.append(
            "the kernel offers no overlay file system: load it (modprobe overlay) and list "
            "it in /etc/modules-load.d so that it loads at boot"
        )
    holder = mount_of(root)
    if holder is not None and holder.fstype == "overlay":
        found.append(
            f"{root} is on an overlay file system ({holder.mountpoint}), which cannot hold "
            "overlay upper and work directories: set [snapshotter] root to a directory on "
            "ext4 or xfs"
        )
    return found
