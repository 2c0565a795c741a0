"""End to end on this host: a real containerd 1.6 with CRI (snapshotter apull, snapshot
annotations on, plain HTTP to the registry) pulls a converted image through CRI's image
service; the layers become remote snapshots (EROFS from apulld's files), `ctr run` reads
through them, and the registry serves only what was read. Then the uninstall script takes
everything down again with the layers still mounted."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_support import TWO_LAYER_REPO, Snapshotter, push_two_layer_image
from serving_support import Apulld, Proxy, tar_contents

from apull.lab import test_image
from apull.registry.client import RegistryClient
from apull.testing.cri_containerd import CriContainerd
from apull.testing.host_containerd import containerd_binary, unmount_all
from apull_node.cri.client import CriError, ImageClient
from apull_node.image import format as fmt
from apull_node.snapshotter.apulld_client import ApulldClient
from apull_node.snapshotter.prewarm_command import Prewarm

pytestmark = pytest.mark.skipif(
    containerd_binary() is None or shutil.which("runc") is None,
    reason="containerd and runc are not installed (make deps installs them)",
)

REPO = TWO_LAYER_REPO
#: containerd (1.6 and 2.x) treats a manifest entry as a layer, and passes its annotations to
#: the snapshotter, only when images.IsLayerType says so: Docker layer types, or OCI types
#: starting with this. Other entries are fetched whole as plain children (our EROFS blob
#: included), and the layers are then unpacked without any labels.
OCI_LAYER_PREFIX = "application/vnd.oci.image.layer."
SCRIPT = Path(__file__).resolve().parents[2] / "roles/apull/files/remove-apull-snapshots.sh"


class Containerd(CriContainerd):
    """Images are named after the counting proxy (what apulld fetches through, from CRI's
    image-ref label); containerd itself reaches the registry directly, as the proxy's mirror
    in its hosts.toml (the proxy answers blob GETs, not the HEADs containerd resolves
    manifests with)."""

    def __init__(self, workdir: Path, snapshotter: str, name: str, upstream: str) -> None:
        super().__init__(
            workdir, snapshotter, [name], registry_mirrors=[f"{name}=http://{upstream}"]
        )


class Stack:
    def __init__(self, base: Path, registry: RegistryClient) -> None:
        self.base = base
        self.proxy = Proxy(registry.address)
        # Every layer of this small image is small: warmed whole it would all be fetched by
        # the pull. Warm only tables and first chunks here (test_apulld_warmup has the rest).
        self.apulld = Apulld(base / "apulld", {"prefetch_layer_max_mb": 0})
        self.apulld.root.mkdir()
        self.apulld.start()
        self.snap = Snapshotter(base / "snap", self.apulld.address)
        self.snap.base.mkdir()
        self.containerd = Containerd(
            base / "containerd", self.snap.address, self.proxy.address, registry.address
        )
        self.snap.containerd_address = self.containerd.address
        self.snap.start()
        self.containerd.start()
        self.image = f"{self.proxy.address}/{REPO}:apull"
        self.registry = registry.address

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr(*args, check=check, namespace="k8s.io")

    def run(self, name: str, *command: str) -> str:
        return self.ctr(
            "run", "--rm", "--snapshotter", "apull",
            "--runc-root", str(self.base / "runc"), "--fifo-dir", str(self.base / "fifo"),
            self.image, name, *command,
        ).stdout  # fmt: skip

    def blob_ids(self) -> set[str]:
        status, body = self.apulld.request("GET", "/v1.0/apulld/blob_config")
        assert status == 200, body
        return {b["blob_id"] for b in body["blobs"]}

    def close(self) -> None:
        try:
            self.containerd.stop()
        finally:
            self.snap.stop()
            unmount_all(self.snap.root)
            self.apulld.close()
            self.proxy.down()


@pytest.fixture(scope="module")
def converted(registry: RegistryClient) -> tuple[list[dict], bytes]:
    return push_two_layer_image(registry)


@pytest.fixture(scope="module")
def stack(registry: RegistryClient, converted) -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="apull-e2e-", dir="/tmp"))
    stack = None
    try:
        stack = Stack(base, registry)
        yield stack
    finally:
        if stack is not None:
            stack.close()
        leftover = unmount_all(base)
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"still mounted after teardown: {leftover}"


def test_a_cri_pull_mounts_the_layers_and_ctr_run_reads_a_fraction(stack: Stack, converted):
    layers, multi = converted
    total = sum(layer["size"] for layer in layers)
    started = time.monotonic()
    with ImageClient(stack.containerd.address) as cri:
        try:
            image_id = cri.pull(stack.image)
        except CriError as err:
            raise AssertionError(f"{err}\nsnapshotter log:\n{stack.snap.log_text()}") from err
    pull_s = time.monotonic() - started
    assert image_id.startswith("sha256:")
    rows = stack.ctr("snapshots", "--snapshotter", "apull", "ls").stdout.splitlines()[1:]
    assert [row.split()[-1] for row in rows] == ["Committed", "Committed"]
    mounts = stack.snap.erofs_mounts()
    assert len(mounts) == 2
    assert sorted(Path(s).name for s in mounts.values()) == sorted(
        layer["digest"].replace(":", "-") for layer in layers
    )
    fetched_by_pull = sum(stack.proxy.bytes_of(layer["digest"]) for layer in layers)
    assert fetched_by_pull < total // 10
    # The snapshotter asked apulld to warm the image (CRI's manifest-digest label), once.
    deadline = time.monotonic() + 10
    while stack.apulld.stats().get("warmed_images", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.apulld.stats()["warmed_images"] == 1
    # With the manifest the snapshotter read from containerd's content store: not fetched.
    assert stack.apulld.stats().get("manifest_bytes_fetched", 0) == 0

    started = time.monotonic()
    assert stack.run("apull-e2e-cat", "/bin/cat", "/etc/hostname") == "apull\n"
    run_s = time.monotonic() - started
    text = stack.run("apull-e2e-text", "/bin/sha256sum", "/data/text")
    expected = tar_contents(multi)[0]["data/text"]
    assert text.split()[0] == hashlib.sha256(expected).hexdigest()
    fetched = {layer["digest"]: stack.proxy.bytes_of(layer["digest"]) for layer in layers}
    per_layer = ", ".join(f"{fetched[x['digest']]}/{x['size']}" for x in layers)
    print(
        f"\nCRI pull {pull_s:.2f} s, first ctr run {run_s:.2f} s; layer bytes from the "
        f"registry: {sum(fetched.values())} of {total} ({per_layer})"
    )
    # The 4 MiB file was never read: its layer came in a small part.
    multi_layer = layers[1]
    assert fetched[multi_layer["digest"]] < multi_layer["size"] // 4
    assert sum(fetched.values()) < total // 2
    assert "mounted on" in stack.snap.log_text()


def test_ctr_images_pull_of_an_apull_image_fails_and_applies_nothing(stack: Stack):
    """containerd 1.6's `ctr images pull` fetches everything, then unpacks with no labels at
    all (so the snapshotter cannot tell an apull layer); the diff service then refuses the
    EROFS media type: the pull fails, nothing is applied as a tar."""
    before = stack.snap.committed()
    direct = stack.image.replace(stack.proxy.address, stack.registry)  # ctr has no mirrors
    result = stack.containerd.ctr(
        "images", "pull", "--plain-http", "--snapshotter", "apull", direct, check=False
    )
    assert result.returncode != 0
    assert "no processor for media-type" in result.stderr, result.stderr
    assert stack.snap.committed() == before  # (containerd leaves the failed active one)
    assert len(stack.snap.erofs_mounts()) == 2


def test_the_layer_media_type_is_one_containerd_unpacks():
    assert fmt.LAYER_MEDIA_TYPE.startswith(OCI_LAYER_PREFIX)


def _prewarm(stack: Stack, image: str, check: bool = False) -> dict:
    args = argparse.Namespace(
        startup_only=False, wait=60.0, retries=0, pull_timeout=120.0, check=check
    )
    with ImageClient(stack.containerd.address) as cri:
        return Prewarm(cri, ApulldClient(stack.apulld.address), args, {}).image(image)


def test_prewarm_pulls_warms_the_rest_and_then_does_nothing(stack: Stack, converted, registry):
    layers, _ = converted
    total = sum(layer["size"] for layer in layers)
    # The original pulled too: it shares its config (the image id) with the converted one,
    # so CRI gives both manifests' digests for the converted tag.
    with ImageClient(stack.containerd.address) as cri:
        cri.pull(stack.image.replace(":apull", ":latest"))
        assert len(cri.status(stack.image).repo_digests) == 2
    result = _prewarm(stack, stack.image)
    assert (result["state"], result["error"], result["lazy"]) == ("warm", "", True)
    assert result["cached"] == result["bytes"] == total
    # Each layer byte came from the registry once, whatever the pull and runs read before.
    assert {x["digest"]: stack.proxy.bytes_of(x["digest"]) for x in layers} == {
        x["digest"]: x["size"] for x in layers
    }
    requests = len(stack.proxy.state.requests)
    checked = _prewarm(stack, stack.image, check=True)
    assert (checked["state"], checked["last"], checked["cached"]) == ("present", "warm", total)
    absent = f"{stack.proxy.address}/{test_image.REPO}:{test_image.TAG}"
    assert _prewarm(stack, absent, check=True)["state"] == "absent"
    again = _prewarm(stack, stack.image)
    assert (again["state"], again["pulled"], again["fetched"]) == ("warm", False, 0)
    assert len(stack.proxy.state.requests) == requests
    # Its original, by its own tag: the registry's digest for the tag tells the twins apart.
    twin = _prewarm(stack, stack.image.replace(":apull", ":latest"))
    assert (twin["state"], twin["pulled"], twin["lazy"]) == ("warm", False, False), twin
    # An image that is not converted: the pull is all.
    test_image.push(registry)
    plain = _prewarm(stack, f"{stack.proxy.address}/{test_image.REPO}:{test_image.TAG}")
    assert (plain["state"], plain["pulled"], plain["lazy"], plain["bytes"]) == (
        "warm",
        True,
        False,
        0,
    )
    assert _prewarm(stack, f"{stack.proxy.address}/none/such:tag")["error"].startswith("pull: ")


def test_the_uninstall_script_removes_the_remote_snapshots(stack: Stack):
    assert stack.snap.erofs_mounts()
    listed = stack.ctr("snapshots", "--snapshotter", "apull", "ls").stdout.splitlines()[1:]
    env = dict(os.environ, CONTAINERD_ADDRESS=stack.containerd.address)
    done = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The script removes some; containerd's garbage collection may take a parent whose last
    # child went before the script gets to it.
    removed = [int(n) for n in re.findall(r"removed (\d+) snapshot\(s\) in k8s.io", done.stdout)]
    assert 1 <= sum(removed) <= len(listed) == 2, (listed, done.stdout)
    assert stack.ctr("snapshots", "--snapshotter", "apull", "ls").stdout.splitlines()[1:] == []
    # containerd's garbage collection removed them from the snapshotter: unmounted, forgotten.
    assert stack.snap.names() == []
    assert stack.snap.erofs_mounts() == {}
    assert stack.blob_ids() == set()
    assert os.listdir(stack.snap.root / "snapshots") == []
