"""A mixed fleet of the node platforms the bundle serves, in one lab
(tests/integration/platforms.txt): Debian 12 x86-64 (python3 3.11), Debian 11 x86-64 (python3
3.9, glibc 2.31, a static containerd 1.6; LAB_BULLSEYE_NODES) and Debian 12 arm64 under
qemu-system-aarch64 (LAB_ARM64_NODES). One `make all` deploys each node its own platform's
build, a second run changes nothing, and on every node a converted image of its architecture,
pulled through CRI, runs lazily over fscache.

Part of `make test-all` (make integration-platforms); a kind the lab lacks is skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
from conftest import ROOT, apull, recap, run_on
from lazy_image import LazyImage, push_and_convert, run_lazily

from apull.lab import layout


@dataclass(frozen=True)
class Platform:
    """What a node of one lab variant is, and which bundle build it must get."""

    variant: str
    debian: str  # /etc/debian_version starts with it
    machine: str  # uname -m
    python: str  # where /usr/bin/python3 leads
    glibc: str
    build: str  # the bundle platform of its snapshotter
    arch: str  # Debian's name, for its images

    @property
    def row(self) -> str:
        """The platform cell of the status table."""
        return f"{self.machine}, {self.glibc}, python3 {self.python}"


PLATFORMS = {
    p.variant: p
    for p in (
        Platform("ondemand", "12.", "x86_64", "3.11", "glibc 2.36", "x86_64-cp311", "amd64"),
        Platform("bullseye", "11.", "x86_64", "3.9", "glibc 2.31", "x86_64-cp39", "amd64"),
        Platform("arm64", "12.", "aarch64", "3.11", "glibc 2.36", "aarch64-cp311", "arm64"),
    )
}
KINDS = list(PLATFORMS)


@pytest.fixture(scope="module")
def fleet(lab: list[layout.LabNode]) -> dict[str, layout.LabNode]:
    """The first lab node of each platform kind; the module is skipped in a lab of Debian 12
    x86-64 nodes only (the shipped one, which the rest of tests/integration covers)."""
    found: dict[str, layout.LabNode] = {}
    for node in lab:
        if node.variant in PLATFORMS:
            found.setdefault(node.variant, node)
    if not set(found) - {"ondemand"}:
        pytest.skip("no node of another platform (LAB_BULLSEYE_NODES, LAB_ARM64_NODES)")
    return found


def node_of(fleet: dict[str, layout.LabNode], kind: str) -> layout.LabNode:
    if kind not in fleet:
        pytest.skip(f"no lab node in the {kind} variant")
    return fleet[kind]


@pytest.fixture(scope="module")
def lazy_images() -> dict[str, LazyImage]:
    return {}


@pytest.mark.parametrize("kind", KINDS)
def test_each_node_is_its_platform(fleet: dict[str, layout.LabNode], kind: str) -> None:
    node, want = node_of(fleet, kind), PLATFORMS[kind]
    assert run_on(node, "cat /etc/debian_version").stdout.startswith(want.debian)
    assert run_on(node, "uname -m").stdout.strip() == want.machine
    python = run_on(node, "readlink -f /usr/bin/python3").stdout.strip()
    assert python == f"/usr/bin/python{want.python}"
    assert run_on(node, "getconf GNU_LIBC_VERSION").stdout.strip() == want.glibc
    version = run_on(node, "containerd --version").stdout
    assert re.search(r" v?1\.6\.\d+", version), version
    assert run_on(node, "systemctl is-active containerd").stdout.strip() == "active"


def test_one_make_all_deploys_every_platform_then_changes_nothing(
    fleet: dict[str, layout.LabNode],
) -> None:
    first = apull("run", "site", "--no-lab", timeout=3600)
    assert first.returncode == 0, first.stdout[-4000:]
    print(first.stdout[-3000:])
    counts = recap(first.stdout)
    manifest = json.loads((ROOT / "build/bundle/manifest.json").read_text())
    for kind, node in fleet.items():
        want = PLATFORMS[kind]
        assert counts[node.name][3] == 0, first.stdout[-4000:]
        row = re.search(rf"^{node.name}\s+{re.escape(want.row)}\s", first.stdout, re.M)
        assert row, (node.name, want.row, first.stdout[-3000:])
        wanted = {b["name"]: b["sha256"] for b in manifest["binaries"]
                  if b["platform"] in ("any", want.build)}  # fmt: skip
        assert len(wanted) == 2
        for name, sha in wanted.items():
            got = run_on(node, f"sha256sum /usr/bin/{name}").stdout.split()[0]
            assert got == sha, (node.name, name, want.build)
        plugins = run_on(node, "ctr plugins ls").stdout
        assert re.search(r"^io\.containerd\.snapshotter\.v1\s+apull\s+\S+\s+ok\s*$", plugins, re.M)
    second = apull("run", "site", "--no-lab", timeout=3600)
    assert second.returncode == 0, second.stdout[-4000:]
    print(second.stdout[-2000:])
    for node in fleet.values():
        assert recap(second.stdout)[node.name][1] == 0, (node.name, second.stdout[-4000:])


@pytest.mark.parametrize("kind", KINDS)
def test_a_converted_image_of_its_arch_runs_lazily(
    fleet: dict[str, layout.LabNode], lazy_images: dict[str, LazyImage], kind: str
) -> None:
    node, arch = node_of(fleet, kind), PLATFORMS[kind].arch
    if arch not in lazy_images:
        lazy_images[arch] = push_and_convert(arch)
    run_lazily(node, lazy_images[arch], f"lazy-{kind}")


def test_the_lab_image_is_one_reference_for_every_arch(fleet: dict[str, layout.LabNode]) -> None:
    """lab/busybox:latest is an index when the lab has arm64 nodes: each node's containerd
    picks its own architecture's manifest from it, and the busybox in it runs there."""
    if "arm64" not in fleet:
        pytest.skip("no arm64 node: the lab image is a plain amd64 manifest")
    ref = f"{layout.guest_registry()}/lab/busybox:latest"
    for kind, node in fleet.items():
        pull = run_on(node, f"ctr images pull --plain-http {ref} >/dev/null")
        assert pull.returncode == 0, pull.stderr
        out = run_on(node, f"ctr run --rm {ref} arch-{kind} /bin/busybox uname -m")
        assert out.stdout.strip() == PLATFORMS[kind].machine, (kind, out.stderr)
