"""The lab's QMP client against a real QEMU (a machine with no board and no disk: nothing
boots, the monitor answers): commands and their answers, QEMU's errors, events skipped,
a monitor that is gone."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apull.lab.qmp import Monitor, QmpError

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Path]:
    socket_path = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults",
         "-qmp", f"unix:{socket_path},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        assert proc.poll() is None, "qemu exited"
        assert time.monotonic() < deadline, "no QMP socket"
        time.sleep(0.05)
    try:
        yield socket_path
    finally:
        proc.kill()
        proc.wait()


def test_commands_answer_and_events_are_skipped(qemu: Path) -> None:
    with Monitor(qemu) as mon:
        assert mon.execute("query-status")["running"] is True
        mon.execute("stop")  # sends a STOP event before or after its answer
        assert mon.execute("query-status")["running"] is False
        mon.execute("cont")
        assert mon.execute("query-status")["status"] == "running"
        info = mon.execute("query-migrate")
        assert isinstance(info, dict)


def test_qemus_error_is_raised_with_its_description(qemu: Path) -> None:
    with Monitor(qemu) as mon:
        with pytest.raises(QmpError, match="no-such-command"):
            mon.execute("no-such-command")
        # The monitor goes on after an error.
        assert "status" in mon.execute("query-status")


def test_a_monitor_that_is_gone_is_a_qmp_error(tmp_path: Path, qemu: Path) -> None:
    with pytest.raises(QmpError, match=r"qmp\.sock"):
        Monitor(tmp_path / "missing" / "qmp.sock").__enter__()
    with Monitor(qemu) as mon:
        mon.execute("quit")
        time.sleep(0.5)
        with pytest.raises(QmpError):
            mon.execute("query-status")
