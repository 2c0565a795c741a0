"""systemd's file descriptor store: hand fds that must outlive apulld (the FUSE connection;
the /dev/cachefiles device and each open object's anonymous fd) to the service manager, and
take them back at the next start.

Storing: one ``FDSTORE=1`` datagram to $NOTIFY_SOCKET with the fd attached (SCM_RIGHTS); the
unit needs ``FileDescriptorStoreMax=`` at least the number of fds kept, else systemd drops
the rest (and says so in its log). ``FDSTOREREMOVE=1`` with the name drops stored fds again.
Taking back: systemd passes stored fds like socket activation, from fd 3 on, with
$LISTEN_PID, $LISTEN_FDS and $LISTEN_FDNAMES.

Names (systemd allows up to 255 printable ASCII characters without ``:``):
``apulld-fuse``, ``apulld-cachefiles``, and ``cachefiles-obj-<object id>-<blob id>`` with
``%`` and ``:`` of the blob id written ``%25`` and ``%3A`` (blob ids longer than a name
allows: ``cachefiles-objh-<object id>-<sha256 of the blob id, 32 hex>``).
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import os
import socket
from dataclasses import dataclass

FUSE_FD_NAME = "apulld-fuse"
DEVICE_FD_NAME = "apulld-cachefiles"
_OBJECT = "cachefiles-obj-"
_OBJECT_HASHED = "cachefiles-objh-"
_NAME_MAX = 255
_FIRST_FD = 3


def object_fd_name(object_id: int, blob_id: str) -> str:
    """The fd store name of an fscache object's anonymous fd."""
    name = f"{_OBJECT}{object_id}-{blob_id.replace('%', '%25').replace(':', '%3A')}"
    if len(name) <= _NAME_MAX and name.isascii() and name.isprintable():
        return name
    return f"{_OBJECT_HASHED}{object_id}-{blob_hash(blob_id)}"


def blob_hash(blob_id: str) -> str:
    return hashlib.sha256(blob_id.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ObjectFdName:
    object_id: int
    blob_id: str  # empty when only the hash is known
    blob_hash: str

    def matches(self, blob_id: str) -> bool:
        return blob_id == self.blob_id if self.blob_id else blob_hash(blob_id) == self.blob_hash


def parse_object_fd_name(name: str) -> ObjectFdName | None:
    """What an object fd's name says, or None when it is not one."""
    for prefix in (_OBJECT, _OBJECT_HASHED):
        if not name.startswith(prefix):
            continue
        number, sep, rest = name[len(prefix) :].partition("-")
        if not sep or not rest or not number.isdigit() or not number.isascii():
            return None
        if prefix == _OBJECT_HASHED:
            return ObjectFdName(int(number), "", rest)
        blob_id = rest.replace("%3A", ":").replace("%25", "%")
        return ObjectFdName(int(number), blob_id, blob_hash(blob_id))
    return None


def inherited_fds() -> dict[str, int]:
    """Named fds passed to this process (each name once; extra fds of a name are closed).
    The variables are removed so that children do not take them for theirs."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
    if pid != str(os.getpid()) or not count.isdigit():
        return {}
    found: dict[str, int] = {}
    for offset in range(int(count)):
        fd = _FIRST_FD + offset
        name = names[offset] if offset < len(names) else "unknown"
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        if name in found:
            with contextlib.suppress(OSError):
                os.close(fd)
            continue
        found[name] = fd
    return found


def notify_socket() -> bool:
    """Whether a service manager listens (fds can be stored at all)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def store(fd: int, name: str) -> bool:
    """Ask the service manager to keep a duplicate of `fd`; False when none listens."""
    return _send(f"FDSTORE=1\nFDNAME={name}", [fd])


def remove(name: str) -> bool:
    """Ask the service manager to close the fds it keeps under `name`."""
    return _send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])


def _send(message: str, fds: list[int]) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendmsg([message.encode()], ancillary)
    except OSError:
        return False
    return True
