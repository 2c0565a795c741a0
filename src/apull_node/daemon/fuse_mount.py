"""Mounting apulld's FUSE filesystem with mount(2) itself (root; no fusermount, no libfuse).

The system calls and /proc/self/mountinfo come from apull_node.service.mount_syscalls (the
snapshotter mounts its layers with the same code); what is FUSE's own lives here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from apull_node.service.mount_syscalls import (
    MS_RDONLY,
    MountEntry,
    MountError,
    mount,
    read_mountinfo,
)
from apull_node.service.mount_syscalls import unmount as _unmount

__all__ = [
    "FS_TYPE",
    "MountEntry",
    "MountError",
    "ensure_mountpoint",
    "is_fuse_device",
    "mount_at",
    "mount_file",
    "mount_fuse",
    "mounts_from",
    "open_fuse_device",
    "read_mountinfo",
    "unmount",
]

FUSE_DEVICE = "/dev/fuse"
FS_TYPE = "fuse.apulld"
MS_NOSUID = 2
MS_NODEV = 4
_FUSE_MAJOR, _FUSE_MINOR = 10, 229
#: rootmode= of the mount: a directory (S_IFDIR, octal).
_ROOTMODE = "40000"


def mount_at(mountpoint: str | Path, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount at `mountpoint`, compared as given: never resolved, since resolving
    a path on our own FUSE mount would wait for the server this process has not started."""
    found = None
    for entry in entries if entries is not None else read_mountinfo():
        if entry.mountpoint == str(mountpoint):
            found = entry
    return found


def mounts_from(directory: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts whose source is a file inside `directory` (EROFS mounted from our files)."""
    prefix = directory.rstrip("/") + "/"
    return [e for e in entries or read_mountinfo() if e.source.startswith(prefix)]


def is_fuse_device(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (
        _FUSE_MAJOR,
        _FUSE_MINOR,
    )


def open_fuse_device(device: str = FUSE_DEVICE) -> int:
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise MountError(
            err.errno, f"cannot open {device}: {err.strerror} (modprobe fuse)"
        ) from err


def mount_fuse(fd: int, mountpoint: str, name: str = "apulld") -> None:
    """Mount a FUSE filesystem served through `fd` (an open /dev/fuse) at `mountpoint`."""
    options = f"fd={fd},rootmode={_ROOTMODE},user_id=0,group_id=0,allow_other,default_permissions"
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    try:
        mount(name, mountpoint, FS_TYPE, flags, options)
    except MountError as err:
        if err.errno != errno.ENODEV:  # ENODEV: no subtype support, plain "fuse"
            raise
        mount(name, mountpoint, "fuse", flags, options)


def unmount(mountpoint: str | Path, detach: bool = True) -> None:
    """umount2(2), detached by default (the FUSE mount may still be in use)."""
    _unmount(str(mountpoint), detach)


def mount_file(source: str, target: str, fstype: str = "erofs", options: str = "") -> None:
    """mount(2) a filesystem image file read-only (EROFS from a regular file: Linux >= 6.12)."""
    mount(source, target, fstype, MS_RDONLY, options)


def ensure_mountpoint(path: Path) -> None:
    """Create the directory (private) unless a mount already sits there."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
