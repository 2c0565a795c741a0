"""A private containerd on the test host, with apull's proxy snapshotter plugged in (tests only).

Everything containerd keeps lives in one work directory (root, state, sockets, its log), so
several can run beside a system containerd. `ctr()` talks to it; `stop()` ends containerd and
any shim it started, then unmounts whatever is still mounted under the work directory.

    with HostContainerd(workdir, snapshotter_address="/tmp/x/apull.sock") as ctd:
        ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "apull", ref)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

#: Plugins a bare test instance does not need (CRI wants CNI; the others want disks we lack).
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)


class ContainerdError(Exception):
    """containerd did not start or a ctr command failed; the message has the details."""


def containerd_binary() -> str | None:
    return shutil.which("containerd")


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ").replace("\\011", "\t")
            point = point.replace("\\012", "\n").replace("\\134", "\\")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_all(path: Path) -> list[Path]:
    """Lazily unmount everything at or below `path`; return what was mounted."""
    points = mounts_under(path)
    for point in points:
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
    return points


def _pids_with_argument(argument: str) -> list[int]:
    """Processes whose command line contains `argument` (our unique work directory)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(argument.encode() in part for part in cmdline):
            pids.append(int(entry))
    return pids


class HostContainerd:
    #: Plugins this instance does not load (a subclass may turn CRI on).
    disabled_plugins: tuple[str, ...] = DISABLED_PLUGINS

    def __init__(
        self, workdir: Path, snapshotter_address: str, snapshotter_name: str = "apull"
    ) -> None:
        self.workdir = workdir.resolve()
        self.snapshotter_address = snapshotter_address
        self.snapshotter_name = snapshotter_name
        self.address = str(self.workdir / "containerd.sock")
        self.config = self.workdir / "config.toml"
        self.log = self.workdir / "containerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        disabled = ", ".join(f'"{p}"' for p in self.disabled_plugins)
        return f"""version = 2
root = "{self.workdir / "root"}"
state = "{self.workdir / "state"}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.workdir / "opt"}"

[proxy_plugins.{self.snapshotter_name}]
  type = "snapshot"
  address = "{self.snapshotter_address}"
"""

    def start(self, timeout: float = 20.0) -> None:
        binary = containerd_binary()
        if binary is None:
            raise ContainerdError("containerd is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text())
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ContainerdError(f"containerd exited early:\n{self.log_tail()}")
            if os.path.exists(self.address):
                probe = self.ctr("version", check=False, timeout=5)
                if probe.returncode == 0:
                    return
            time.sleep(0.1)
        raise ContainerdError(f"containerd did not answer in {timeout}s:\n{self.log_tail()}")

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120.0, namespace: str = "default"
    ) -> subprocess.CompletedProcess[str]:
        command = ["ctr", "--address", self.address, "--namespace", namespace, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ContainerdError(
                f"{' '.join(command)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
                f"containerd log:\n{self.log_tail()}"
            )
        return result

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Kill leftover tasks, stop containerd, then its shims, then unmount."""
        if self.process is not None:
            if self.process.poll() is None:
                for task in self.ctr("tasks", "ls", "-q", check=False, timeout=30).stdout.split():
                    self.ctr("tasks", "rm", "--force", task, check=False, timeout=30)
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        # Shims outlive containerd by design; ours carry our socket path in their arguments.
        for pid in _pids_with_argument(self.address):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_all(self.workdir)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
