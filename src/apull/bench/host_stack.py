"""The whole apull stack on this host, for the benchmark: apulld, the snapshotter, containerd.

The host kernel has no fscache on-demand, so apulld runs its file backend (FUSE + file-backed
EROFS). containerd is a private instance (its own root, state and sockets under the work
directory) with CRI enabled, CRI's snapshotter set to apull and the registry reachable over
plain HTTP, so a CRI pull of a converted image takes the remote-snapshot path, as kubelet's
pulls do on a node. Processes run without systemd (apulld then keeps no fd store).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from apull.testing.cri_containerd import CriContainerd
from apull.testing.host_containerd import unmount_all

SNAPSHOTTER = "apull"


class StackError(RuntimeError):
    """A daemon of the stack did not start; the message has its log."""


class HostStack:
    """apulld (file backend) + apull-snapshotter + containerd (CRI) under `workdir`."""

    def __init__(self, workdir: Path, registry: str) -> None:
        self.workdir = workdir.resolve()
        self.registry = registry
        self.config = self.workdir / "apull.toml"
        self.apulld_address = str(self.workdir / "apulld.sock")
        self.snapshotter_address = str(self.workdir / "snapshotter.sock")
        self.cache_dir = self.workdir / "data" / "cachefiles"
        self.snapshotter_root = self.workdir / "data" / "snapshotter"
        self.containerd = CriContainerd(
            self.workdir / "containerd", self.snapshotter_address, [registry], SNAPSHOTTER
        )
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}

    def _write_config(self) -> None:
        settings: dict[str, dict[str, object]] = {
            "global": {"log_level": "info"},
            "snapshotter": {
                "address": self.snapshotter_address,
                "root": str(self.snapshotter_root),
                "apulld_address": self.apulld_address,
                "containerd_address": self.containerd.address,
            },
            "apulld": {
                "address": self.apulld_address,
                "cache_dir": str(self.cache_dir),
                "backend": "file",
                "registry_insecure": [self.registry],
            },
        }
        lines = ["version = 1"]
        for section, values in settings.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, module: str, socket_path: str, timeout: float = 30.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        with log:
            process = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._daemons[name] = process
        deadline = time.monotonic() + timeout
        while not os.path.exists(socket_path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"{name} did not start:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start_daemons(self) -> None:
        self._spawn("apulld", "apull_node.daemon", self.apulld_address)
        self._spawn("snapshotter", "apull_node.snapshotter.main", self.snapshotter_address)

    def stop_daemons(self) -> None:
        for name in ("snapshotter", "apulld"):
            process = self._daemons.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self.start_daemons()
        self.containerd.start()

    def wipe_caches(self) -> None:
        """Daemons stopped, apulld's cache gone, daemons started again (snapshots stay)."""
        self.stop_daemons()
        unmount_all(self.cache_dir.parent / "apulld")
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.start_daemons()

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            self.stop_daemons()
            unmount_all(self.workdir)
