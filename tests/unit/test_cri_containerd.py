"""CRI pulls through the real containerd 1.6 on this host, with our CRI client.

A private containerd with its CRI plugin on (apull.testing.cri_containerd: the config is
made by config_patch, as the containerd role makes it, with apull as CRI's snapshotter and
one insecure registry), the real snapshotter process, and registries of the module's own
bound to this host's LAN address: containerd treats a loopback registry as plain HTTP
whatever the config says, so only a non-loopback one shows that the mirror config is what
makes the plain-HTTP pull work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apull.lab import test_image
from apull.registry.client import Blob, RegistryClient
from apull.testing.cri_containerd import CRI_NAMESPACE, CriContainerd
from apull.testing.host_containerd import containerd_binary, unmount_all
from apull.testing.pull_through import PullThroughCache
from apull_node.cri.client import CriError, ImageClient, image_status, pull_image, remove_image

pytestmark = pytest.mark.skipif(
    containerd_binary() is None or shutil.which("docker-registry") is None,
    reason="containerd or docker-registry is not installed (make deps installs them)",
)

#: Host paths a CRI plugin would use by default; the private instance must not create them.
HOST_PATHS = (
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/lib/containerd/io.containerd.grpc.v1.cri",
    "/run/containerd/io.containerd.grpc.v1.cri",
    "/var/run/netns",
)


def lan_address() -> str | None:
    """This host's first global IPv4 address (not loopback), if it has one."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def lan_registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], str]]:
    """Start registries on the LAN address, each with the lab's busybox; returns host:port."""
    host = lan_address()
    if host is None:
        pytest.skip("this host has no non-loopback IPv4 address to serve a registry on")
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> str:
        root = tmp_path_factory.mktemp("lan-registry")
        address = f"{host}:{free_port(host)}"
        (root / "config.yml").write_text(
            "version: 0.1\nlog: {level: error}\n"
            f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
            f"http: {{addr: {address}}}\n"
        )
        procs.append(
            subprocess.Popen(
                ["docker-registry", "serve", str(root / "config.yml")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        client = RegistryClient(address)
        deadline = time.monotonic() + 20
        while not client.ping():
            assert time.monotonic() < deadline, "registry did not start"
            time.sleep(0.1)
        test_image.push(client)
        return address

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


class Stack:
    """The snapshotter process and a CRI-enabled containerd using it."""

    def __init__(self, base: Path, insecure: list[str]) -> None:
        self.base = base
        self.snapshotter_address = str(base / "apull.sock")
        self.log = base / "snapshotter.log"
        self.snapshotter: subprocess.Popen[bytes] | None = None
        self.containerd = CriContainerd(base / "containerd", self.snapshotter_address, insecure)

    def start(self) -> None:
        (self.base / "config.toml").write_text('[global]\nlog_level = "debug"\n')
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.base / "notify.sock"))
        notify.settimeout(20)
        with notify, open(self.log, "wb") as log:
            self.snapshotter = subprocess.Popen(
                [sys.executable, "-m", "apull_node.snapshotter.main", "--config",
                 str(self.base / "config.toml"), "--address", self.snapshotter_address,
                 "--root", str(self.base / "snapshotter")],
                env=dict(os.environ, NOTIFY_SOCKET=str(self.base / "notify.sock")),
                stdout=log,
                stderr=log,
            )  # fmt: skip
            assert notify.recv(4096).startswith(b"READY=1"), self.log.read_text()
        self.containerd.start()

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            if self.snapshotter is not None and self.snapshotter.poll() is None:
                self.snapshotter.send_signal(signal.SIGTERM)
                try:
                    self.snapshotter.wait(15)
                except subprocess.TimeoutExpired:
                    self.snapshotter.kill()
                    self.snapshotter.wait()
            unmount_all(self.base)

    def ctr(self, *args: str) -> str:
        return self.containerd.ctr(*args, namespace=CRI_NAMESPACE).stdout

    @property
    def address(self) -> str:
        return self.containerd.address


@pytest.fixture(scope="module")
def insecure_registry(lan_registries: Callable[[], str]) -> str:
    """The registry the config names as insecure."""
    return lan_registries()


@pytest.fixture(scope="module")
def other_registry(lan_registries: Callable[[], str]) -> str:
    """A plain-HTTP registry the config does not name."""
    return lan_registries()


@pytest.fixture(scope="module")
def host_paths_before() -> dict[str, bool]:
    return {path: os.path.lexists(path) for path in HOST_PATHS}


@pytest.fixture(scope="module")
def stack(insecure_registry: str, host_paths_before: dict[str, bool]) -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="apull-cri-", dir="/tmp"))
    stack = Stack(base, [insecure_registry])
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        leftover = unmount_all(base)
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"still mounted after teardown: {leftover}"


@pytest.fixture(scope="module")
def pulled(stack: Stack, insecure_registry: str) -> tuple[str, str, float]:
    """(image, the ref CRI returned, seconds) for busybox pulled through CRI."""
    image = f"{insecure_registry}/{test_image.REPO}:{test_image.TAG}"
    started = time.monotonic()
    ref = pull_image(stack.address, image, timeout=120)
    return image, ref, time.monotonic() - started


def test_the_config_is_the_roles(stack: Stack, insecure_registry: str) -> None:
    text = stack.containerd.config.read_text()
    hosts_dir = stack.containerd.hosts_dir
    assert (
        f'[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{hosts_dir}"\n'
    ) in text
    hosts = (hosts_dir / insecure_registry / "hosts.toml").read_text()
    assert f'server = "http://{insecure_registry}"' in hosts.splitlines()
    assert 'snapshotter = "apull"' in text
    assert "disable_snapshot_annotations = false" in text


def test_cri_runs_privately(stack: Stack, host_paths_before: dict[str, bool]) -> None:
    plugins = stack.ctr("plugins", "ls").splitlines()
    assert any(line.split()[:2] == ["io.containerd.grpc.v1", "cri"] and line.split()[-1] == "ok"
               for line in plugins), plugins  # fmt: skip
    # CRI keeps its state under the instance's state directory.
    assert (stack.containerd.workdir / "state" / "io.containerd.grpc.v1.cri").is_dir()
    assert {path: os.path.lexists(path) for path in HOST_PATHS} == host_paths_before


def test_pull_through_cri_over_plain_http(
    stack: Stack, pulled: tuple[str, str, float], insecure_registry: str
) -> None:
    image, ref, seconds = pulled
    assert ref.startswith("sha256:") and len(ref) == 71
    assert image in stack.ctr("images", "ls", "-q").split()
    status = image_status(stack.address, image)
    assert status is not None
    assert status.id == ref
    assert image in status.repo_tags
    assert status.size > 0
    print(f"CRI pull of {image}: {seconds:.2f} s")


def test_cri_unpacked_into_the_apull_snapshotter(
    stack: Stack, pulled: tuple[str, str, float]
) -> None:
    listing = stack.ctr("snapshots", "--snapshotter", "apull", "ls")
    rows = [line.split() for line in listing.splitlines()]
    committed = [r for r in rows[1:] if r[-1] == "Committed"]
    assert len(committed) == 1, rows
    # CRI asked our snapshotter, in its namespace, with the layer annotations on.
    log = stack.log.read_text()
    assert f'key: "{CRI_NAMESPACE}/' in log
    assert "containerd.io/snapshot/cri.layer-digest" in log


def test_a_registry_not_named_insecure_is_refused(stack: Stack, other_registry: str) -> None:
    image = f"{other_registry}/{test_image.REPO}:{test_image.TAG}"
    with pytest.raises(CriError) as err:
        pull_image(stack.address, image, timeout=60)
    assert "HTTP response to HTTPS client" in str(err.value)
    assert image not in stack.ctr("images", "ls", "-q").split()


def test_the_cli_pulls_and_prints_the_time(stack: Stack, insecure_registry: str) -> None:
    image = f"{insecure_registry}/{test_image.REPO}:{test_image.TAG}"
    run = subprocess.run(
        [sys.executable, "-m", "apull_node.cri.cli", "--address", stack.address, "pull", "--json",
         image],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["image"] == image
    assert answer["image_ref"].startswith("sha256:")
    assert answer["seconds"] > 0
    listed = subprocess.run(
        [sys.executable, "-m", "apull_node.cri.cli", "--address", stack.address, "ls"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert image in listed


def test_remove(stack: Stack, pulled: tuple[str, str, float]) -> None:
    image, ref, _ = pulled
    remove_image(stack.address, image)
    assert image_status(stack.address, image) is None
    assert image not in stack.ctr("images", "ls", "-q").split()
    with ImageClient(stack.address) as client:
        client.remove(image)  # absent: not an error
        assert all(ref != i.id for i in client.list())


# --- a pull-through cache as the registry's mirror (containerd's hosts.toml) --------------


def _busybox() -> tuple[Blob, list[Blob]]:
    config, layer = test_image.build()
    return config, [layer]


def test_cri_pulls_through_the_mirror_then_from_the_origin_when_it_is_down(
    lan_registries: Callable[[], str], tmp_path: Path
) -> None:
    origin = lan_registries()
    cache = PullThroughCache(tmp_path / "mirror", origin, host=origin.rsplit(":", 1)[0])
    cache.start()
    mirrors = [f"{origin}=http://{cache.address}"]
    ctd = CriContainerd(tmp_path / "ctd", str(tmp_path / "no-snapshotter.sock"), [origin],
                        cri_snapshotter=False, registry_mirrors=mirrors)  # fmt: skip
    try:
        ctd.start()
        image = f"{origin}/{test_image.REPO}:{test_image.TAG}"
        started = time.monotonic()
        ref = pull_image(ctd.address, image, timeout=120)
        through_mirror = time.monotonic() - started
        asked = cache.requests()
        ns = origin.replace(":", "%3A")
        assert f"/v2/{test_image.REPO}/manifests/{test_image.TAG}?ns={ns}" in asked, asked
        assert any(f"/v2/{test_image.REPO}/blobs/sha256:" in uri for uri in asked), asked

        # The mirror goes down; the next pull (a manifest containerd does not have) is
        # served by the origin.
        cache.stop()
        RegistryClient(origin).push_image("lab/other", "v1", *_busybox())
        other = f"{origin}/lab/other:v1"
        started = time.monotonic()
        assert pull_image(ctd.address, other, timeout=120) == ref
        from_origin = time.monotonic() - started
        assert len(cache.requests()) == len(asked)
        print(f"CRI pull through the mirror {through_mirror:.2f} s; "
              f"with the mirror down, from the origin {from_origin:.2f} s")  # fmt: skip
    finally:
        ctd.stop()
        cache.stop()
        unmount_all(tmp_path)
