"""The lab's registry: Debian's docker-registry (distribution 2.8) serving on the host's
loopback; QEMU forwards layout.GUEST_REGISTRY_ADDR inside every node to it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from apull.lab import layout, processes
from apull.lab.run import LabError, tail
from apull.registry.client import RegistryClient


def registry_dir() -> Path:
    return layout.state_dir() / "registry"


def access_log() -> Path:
    """The registry's log, access lines included (benchmarks count served bytes from it)."""
    return registry_dir() / "registry.log"


def _config() -> str:
    return f"""version: 0.1
log:
  # Access lines only (benchmarks count served bytes from them): the info lines for every
  # request would double the registry's work per request.
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {registry_dir() / "data"}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
http:
  addr: {layout.host_registry()}
"""


def ensure_registry(timeout: float = 30.0) -> RegistryClient:
    client = RegistryClient(layout.host_registry())
    pidfile = registry_dir() / "registry.pid"
    config = registry_dir() / "config.yml"
    current = config.exists() and config.read_text() == _config()
    if current and processes.is_alive(pidfile) and client.ping():
        return client
    processes.stop(pidfile)
    if client.ping():
        raise LabError(f"another registry already answers on {layout.host_registry()}")
    registry_dir().mkdir(parents=True, exist_ok=True)
    config.write_text(_config())
    with access_log().open("a") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while not client.ping():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(
                f"registry did not start; last lines of {access_log()}:\n{tail(access_log())}"
            )
        time.sleep(0.2)
    return client


def stop_registry() -> None:
    processes.stop(registry_dir() / "registry.pid")
