"""mount(2) and umount2(2) through ctypes, and what /proc/self/mountinfo says is mounted.

Standard library only (both node binaries carry apull_node.service). The services run as root in
the host's mount namespace, so what they mount is what containerd and the runtimes see.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from dataclasses import dataclass
from functools import cache

MS_RDONLY = 1
MS_BIND = 4096
MNT_DETACH = 2
MOUNTINFO = "/proc/self/mountinfo"


class MountError(OSError):
    """mount(2) or umount2(2) failed; the message names the call, the path and the errno."""


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str  # the superblock options (EROFS: fsid=..., the source file, ...)


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); `data` is the filesystem's option string ("" passes none)."""
    result = _libc().mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None
    )
    if result != 0:
        err = ctypes.get_errno()
        shown = f" -o {data}" if data else ""
        raise MountError(err, f"mount -t {fstype}{shown} {source} {target}: {os.strerror(err)}")


def unmount(target: str, detach: bool = False) -> None:
    """umount2(2); `detach` is MNT_DETACH (gone from the tree now, freed when unused)."""
    if _libc().umount2(target.encode(), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"umount {target}: {os.strerror(err)}")


def unmount_or_detach(target: str) -> bool:
    """Unmount; when busy (an overlay still uses it as a lower layer), detach. True: detached."""
    try:
        unmount(target)
        return False
    except MountError as err:
        if err.errno != errno.EBUSY:
            raise
    unmount(target, detach=True)
    return True


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount, in mount order (a later entry at one mountpoint is on top)."""
    entries = []
    with open(path) as stream:
        for line in stream:
            left, sep, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if not sep or len(fields) < 5 or len(tail) < 2:
                continue
            options = tail[2] if len(tail) > 2 else ""
            entries.append(
                MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]), _unescape(options))
            )
    return entries


def mount_at(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount whose mountpoint is `path` (resolved), if any."""
    real = os.path.realpath(path)
    found = None
    for entry in read_mountinfo() if entries is None else entries:
        if entry.mountpoint == real:
            found = entry
    return found


def mountpoints_under(path: str, entries: list[MountEntry] | None = None) -> list[str]:
    """Mountpoints at or below `path` (resolved), deepest first, each once."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    points = {
        e.mountpoint
        for e in (read_mountinfo() if entries is None else entries)
        if e.mountpoint == real or e.mountpoint.startswith(prefix)
    }
    return sorted(points, key=lambda p: (p.count("/"), p), reverse=True)
