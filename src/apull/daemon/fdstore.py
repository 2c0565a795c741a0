"""systemd's file descriptor store: hand the FUSE connection to the service manager so it
outlives an apulld restart, and take it back at the next start.

Storing: one ``FDSTORE=1`` datagram to $NOTIFY_SOCKET with the fd attached (SCM_RIGHTS); the
unit needs ``FileDescriptorStoreMax=`` > 0, else systemd drops it (and says so in its log).
Taking back: systemd passes stored fds like socket activation, from fd 3 on, with
$LISTEN_PID, $LISTEN_FDS and $LISTEN_FDNAMES.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket

FUSE_FD_NAME = "apulld-fuse"
_FIRST_FD = 3


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


def store(fd: int, name: str) -> bool:
    """Ask the service manager to keep a duplicate of `fd`; False when none listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = f"FDSTORE=1\nFDNAME={name}".encode()
    fds = array.array("i", [fd])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    except OSError:
        return False
    return True
