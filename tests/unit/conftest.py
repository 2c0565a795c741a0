"""Shared unit-test fixtures: a real registry v2 server (Debian's docker-registry) of our own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_support import Apulld, Layer, Mounts, Proxy, converted_images

from apull.lab import test_image
from apull.registry.client import RegistryClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryClient]:
    """An empty registry on a free port, for one test module."""
    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is missing: run `make deps`"
    root: Path = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    client = RegistryClient(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 20
    while not client.ping():
        assert time.monotonic() < deadline, "registry did not start"
        time.sleep(0.1)
    yield client
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def busybox_ref(registry: RegistryClient) -> str:
    """The lab's test image (static busybox, one layer), pushed to the module's registry."""
    test_image.push(registry)
    return f"{registry.address}/{test_image.REPO}:{test_image.TAG}"


# --- apulld serving: converted layers, a counting/corrupting proxy, a daemon, mounts ---------


@pytest.fixture(scope="module")
def images(registry: RegistryClient) -> dict[str, Layer]:
    """The serving tests' images, converted into the module's registry."""
    return converted_images(registry)


@pytest.fixture
def proxy(registry: RegistryClient) -> Iterator[Proxy]:
    front = Proxy(registry.address)
    yield front
    front.down()


@pytest.fixture
def apulld(tmp_path: Path) -> Iterator[Apulld]:
    daemon = Apulld(tmp_path)
    yield daemon
    daemon.close()


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    active = Mounts(tmp_path)
    yield active
    active.close()
