"""Pid files of the lab's background processes, against real processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
