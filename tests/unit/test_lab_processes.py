"""Pid files of the lab's background processes, against real processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from apull.lab import processes


def test_runs_and_stop_check_the_program(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    pidfile = tmp_path / "x.pid"
    pidfile.write_text(f"{proc.pid}\n")
    try:
        assert processes.runs(pidfile, "sleep")
        # A pid file naming some other program's process (a reused pid): not ours to stop.
        assert not processes.runs(pidfile, "etcd")
        assert processes.stop(pidfile, program="etcd") is False
        assert not pidfile.exists()
        assert proc.poll() is None  # still running
        pidfile.write_text(f"{proc.pid}\n")
        assert processes.stop(pidfile, program="sleep") is True
        assert proc.wait(timeout=10) is not None
        assert not processes.runs(pidfile, "sleep")
    finally:
        proc.kill()
        proc.wait()


def test_runs_waits_out_the_empty_command_line_of_an_exec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after Popen, /proc/PID/cmdline can read empty (the exec has begun, the new
    program's arguments are not mapped yet): that is not "some other program"."""
    proc = subprocess.Popen(["sleep", "60"])
    pidfile = tmp_path / "x.pid"
    pidfile.write_text(f"{proc.pid}\n")
    real = processes.cmdline
    reads: list[int] = []

    def mid_exec(pid: int) -> bytes:
        reads.append(pid)
        return b"" if len(reads) <= 3 else real(pid)

    monkeypatch.setattr(processes, "cmdline", mid_exec)
    monkeypatch.setattr(processes, "EXEC_RETRY_S", 0.01)
    try:
        assert processes.runs(pidfile, "sleep")
        assert len(reads) == 4
        reads.clear()
        monkeypatch.setattr(processes, "cmdline", lambda pid: b"")
        assert not processes.runs(pidfile, "sleep")  # empty for good: not running as asked
    finally:
        proc.kill()
        proc.wait()
