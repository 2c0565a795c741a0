"""A QEMU Machine Protocol client for the lab's nodes: one Unix socket per node (nodes.py starts
QEMU with `-qmp unix:...`), JSON commands one at a time, events skipped."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from apull.lab.run import LabError


class QmpError(LabError):
    """QEMU answered a command with an error, or the monitor could not be reached."""


class Monitor:
    """A connected monitor. Use as a context manager: `with Monitor(path) as mon: ...`."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> Monitor:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise QmpError(f"QEMU monitor {self.path}: {exc}") from exc
        self._sock = sock
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"QEMU monitor {self.path}: no greeting, got {greeting!r}")
        self.execute("qmp_capabilities")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise QmpError(f"QEMU monitor {self.path}: {exc}") from exc
            if not chunk:
                raise QmpError(f"QEMU monitor {self.path}: closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; its `return` value, or QmpError with QEMU's description."""
        assert self._sock is not None
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QEMU monitor {self.path}: {exc}") from exc
        while True:
            message = self._read()
            if "event" in message:
                continue
            if "error" in message:
                error = message["error"]
                raise QmpError(f"QEMU {command}: {error.get('desc', error)}")
            return message.get("return")
