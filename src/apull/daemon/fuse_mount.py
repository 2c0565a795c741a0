"""Mounting apulld's FUSE filesystem with mount(2) itself (root; no fusermount, no libfuse),
and reading /proc/self/mountinfo to see what is mounted where."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

FUSE_DEVICE = "/dev/fuse"
FS_TYPE = "fuse.apulld"
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
_FUSE_MAJOR, _FUSE_MINOR = 10, 229
#: rootmode= of the mount: a directory (S_IFDIR, octal).
_ROOTMODE = "40000"


class MountError(OSError):
    """mount(2) or umount(2) failed; the message names the path and the errno."""


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries: list[MountEntry] = []
    with open(path) as stream:
        for line in stream:
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 2:
                continue
            entries.append(
                MountEntry(int(fields[0]), _unescape(fields[4]), tail[0], _unescape(tail[1]))
            )
    return entries


def mount_at(mountpoint: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount at `mountpoint`, if any."""
    found = None
    for entry in entries if entries is not None else read_mountinfo():
        if entry.mountpoint == mountpoint:
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
    libc = _libc()
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    for fstype in (FS_TYPE, "fuse"):
        result = libc.mount(name.encode(), mountpoint.encode(), fstype.encode(), flags,
                            options.encode())  # fmt: skip
        if result == 0:
            return
        err = ctypes.get_errno()
        if fstype == FS_TYPE and err == 19:  # ENODEV: no subtype support, plain "fuse"
            continue
        raise MountError(err, f"mount -t {fstype} {mountpoint}: {os.strerror(err)}")


def unmount(mountpoint: str, detach: bool = True) -> None:
    result = _libc().umount2(mountpoint.encode(), MNT_DETACH if detach else 0)
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"umount {mountpoint}: {os.strerror(err)}")


def mount_file(source: str, target: str, fstype: str = "erofs", options: str = "") -> None:
    """mount(2) a filesystem image file read-only (EROFS from a regular file: Linux >= 6.12)."""
    result = _libc().mount(source.encode(), target.encode(), fstype.encode(), MS_RDONLY,
                           options.encode() or None)  # fmt: skip
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


def ensure_mountpoint(path: Path) -> None:
    """Create the directory (private) unless a mount already sits there."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
