"""Unix sockets the services listen on: stale files removed, mode set before use."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path


class SocketInUseError(Exception):
    """Another live process already answers on the socket path."""


def prepare_socket_path(path: str) -> None:
    """Make `path` bindable: create its directory, remove a stale socket, refuse a live one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUseError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        return
    finally:
        probe.close()
    raise SocketInUseError(f"{path}: another process is listening")


def restrict_socket(path: str, mode: int = 0o600) -> None:
    os.chmod(path, mode)
