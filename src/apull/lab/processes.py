"""Background processes of the lab (QEMU nodes, the switch, the registry) tracked by pid files."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

#: How often, and how far apart, an empty command line is read again (see runs).
EXEC_RETRIES = 20
EXEC_RETRY_S = 0.05


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_alive(pidfile: Path) -> bool:
    pid = read_pid(pidfile)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def runs(pidfile: Path, program: str) -> bool:
    """True if pidfile's process is alive and is `program` (its command line names it): a pid
    file that outlived a host reboot may name some other process by now."""
    pid = read_pid(pidfile)
    if pid is None or not is_alive(pidfile):
        return False
    # A process caught in exec (just started: its parent saw the exec begin) has an empty
    # command line for a moment; ask again before saying it is something else.
    line = cmdline(pid)
    for _ in range(EXEC_RETRIES):
        if line:
            break
        time.sleep(EXEC_RETRY_S)
        line = cmdline(pid)
    return program.encode() in line


def stop(pidfile: Path, timeout: float = 10.0, program: str | None = None) -> bool:
    """Stop the process behind pidfile (TERM, then KILL); True if one was running. With
    `program`, only if the process is that program (else the stale pid file goes)."""
    pid = read_pid(pidfile)
    if pid is None or not is_alive(pidfile) or (program and not runs(pidfile, program)):
        pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_alive(pidfile):
        time.sleep(0.2)
    if is_alive(pidfile):
        os.kill(pid, signal.SIGKILL)
        while is_alive(pidfile):
            time.sleep(0.1)
    pidfile.unlink(missing_ok=True)
    return True
