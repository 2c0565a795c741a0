"""A node of the oldest userland the bundle serves: Debian 11 (python3 3.9, glibc 2.31) on the
lab's on-demand kernel, with a static containerd 1.6 (LAB_BULLSEYE_NODES). `make all` deploys
the x86_64-cp39 build there, a second run changes nothing, and a converted image pulled
through CRI runs lazily over fscache.

Part of `make test-all` (make integration-platforms: a lab of one such node,
tests/integration/platforms.txt); skipped in a lab without one.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT, apull, recap, run_on
from lazy_image import LazyImage, push_and_convert
from test_node_preparation import CRI, K8S_CTR, apulld_ping, fetched, forget_image

from apull.lab import layout


@pytest.fixture(scope="module")
def node(lab: list[layout.LabNode]) -> layout.LabNode:
    found = [n for n in lab if n.variant == "bullseye"]
    if not found:
        pytest.skip("no lab node in the bullseye variant (LAB_BULLSEYE_NODES)")
    return found[0]


@pytest.fixture(scope="module")
def lazy_image() -> LazyImage:
    return push_and_convert()


def test_the_node_is_debian_11_with_a_containerd_new_enough(node: layout.LabNode) -> None:
    assert run_on(node, "cat /etc/debian_version").stdout.startswith("11.")
    assert run_on(node, "readlink -f /usr/bin/python3").stdout.strip() == "/usr/bin/python3.9"
    assert run_on(node, "getconf GNU_LIBC_VERSION").stdout.strip() == "glibc 2.31"
    version = run_on(node, "containerd --version").stdout
    assert re.search(r" 1\.6\.\d+ ", version), version
    assert run_on(node, "systemctl is-active containerd").stdout.strip() == "active"


def test_make_all_deploys_its_build_then_changes_nothing(node: layout.LabNode) -> None:
    first = apull("run", "site", "--no-lab", "--limit", node.name, timeout=1800)
    assert first.returncode == 0, first.stdout[-4000:]
    assert recap(first.stdout)[node.name][1] > 0
    row = re.search(rf"^{node.name}\s+(x86_64, glibc 2\.31, python3 3\.9)\s", first.stdout, re.M)
    assert row, first.stdout[-3000:]
    manifest = json.loads((ROOT / "build/bundle/manifest.json").read_text())
    wanted = {b["name"]: b["sha256"] for b in manifest["binaries"]
              if b["platform"] in ("any", "x86_64-cp39")}  # fmt: skip
    for name, sha in wanted.items():
        assert run_on(node, f"sha256sum /usr/bin/{name}").stdout.split()[0] == sha, name
    plugins = run_on(node, "ctr plugins ls").stdout
    assert re.search(r"^io\.containerd\.snapshotter\.v1\s+apull\s+\S+\s+ok\s*$", plugins, re.M)
    second = apull("run", "site", "--no-lab", "--limit", node.name, timeout=1800)
    assert second.returncode == 0, second.stdout[-4000:]
    assert recap(second.stdout)[node.name][1] == 0, second.stdout[-4000:]


def test_a_converted_image_runs_lazily(node: layout.LabNode, lazy_image: LazyImage) -> None:
    forget_image(node, lazy_image.ref)
    assert apulld_ping(node)["backend"] == "fscache"
    before = fetched(node)
    pull = run_on(node, f"{CRI} pull --json {lazy_image.ref}")
    assert pull.returncode == 0, pull.stderr
    run = run_on(
        node, f"{K8S_CTR} run --rm --snapshotter apull {lazy_image.ref} lazy9 cat /data/hello"
    )
    assert run.stdout == lazy_image.files["data/hello"].decode(), run.stderr
    mounts = run_on(node, "grep ' erofs ' /proc/mounts").stdout.splitlines()
    ours = [m for m in mounts if "/var/lib/containerd-apull/snapshots/" in m]
    assert len(ours) >= 2 and all("fsid=" in m for m in ours), mounts
    got = fetched(node) - before
    print(f"{node.name}: fetched {got} of {lazy_image.erofs_bytes} bytes")
    assert 0 < got < 0.15 * lazy_image.erofs_bytes
