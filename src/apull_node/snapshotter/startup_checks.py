"""What the snapshotter checks before it opens its root, each failure with its fix.

containerd's overlay snapshotter finds such problems when a container first mounts; ours
refuses to start instead, naming the setting or the command that fixes it:

- the kernel must offer overlayfs (every snapshot with a parent is an overlay mount): built
  in, loaded, or a module it can load. At boot the snapshotter starts before containerd, and
  overlay is then often a module nobody has loaded yet; the first overlay mount loads it
  (the kernel asks modprobe for `fs-overlay`), so a loadable module counts as offered;
- the root must not itself be on overlayfs: an overlay's upper and work directories cannot
  live there (a snapshotter run inside a container with its root on the container's own
  file system).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from apull_node.service.mount_syscalls import MountEntry, read_mountinfo

FILESYSTEMS = "/proc/filesystems"
#: overlay's module in modules.builtin / modules.dep, maybe compressed (Debian 13: .ko.xz).
OVERLAY_MODULE = re.compile(r"(^|/)overlay\.ko(\.xz|\.zst|\.gz)?$")


def modules_dir() -> Path:
    """The running kernel's module directory."""
    return Path("/lib/modules") / os.uname().release


def overlay_offered(filesystems: str, modules: Path) -> bool:
    """overlay is registered, or the running kernel has it built in or as a module."""
    with open(filesystems) as stream:
        if "overlay" in {line.split()[-1] for line in stream if line.strip()}:
            return True
    for index in ("modules.builtin", "modules.dep"):
        try:
            with open(modules / index) as stream:
                if any(OVERLAY_MODULE.search(line.split(":", 1)[0].strip()) for line in stream):
                    return True
        except OSError:
            continue
    return False


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


def problems(root: Path, filesystems: str = FILESYSTEMS, modules: Path | None = None) -> list[str]:
    """Why the snapshotter cannot serve from `root` on this node, each with its fix."""
    found = []
    if not overlay_offered(filesystems, modules_dir() if modules is None else modules):
        found.append(
            "the kernel offers no overlay file system, built in or as a module: install the "
            "kernel's modules package (overlay.ko under /lib/modules/$(uname -r)), or boot a "
            "kernel built with CONFIG_OVERLAY_FS"
        )
    holder = mount_of(root)
    if holder is not None and holder.fstype == "overlay":
        found.append(
            f"{root} is on an overlay file system ({holder.mountpoint}), which cannot hold "
            "overlay upper and work directories: set [snapshotter] root to a directory on "
            "ext4 or xfs"
        )
    return found
