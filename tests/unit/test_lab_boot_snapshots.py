"""Which boot snapshot a reset may resume: only one saved from the command line the node
would boot with now, whole (the QEMU side is in tests/integration/test_boot_snapshots.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from apull.lab import boot_snapshots, layout, nodes
from apull.lab.image import LabImages


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabImages:
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path / "state"))
    build = tmp_path / "images" / "one"
    build.mkdir(parents=True)
    return LabImages(build, build / "vmlinuz", build / "initrd.img", "6.1.0-50-amd64")


def saved(nd: nodes.NodeDir, images: LabImages) -> boot_snapshots.BootSnapshot:
    snap = boot_snapshots.BootSnapshot(nd)
    snap.path.mkdir(parents=True)
    snap.disk.write_bytes(b"qcow2")
    snap.state.write_bytes(b"state")
    snap.key_file.write_text(boot_snapshots.command_key(nd, images) + "\n")
    return snap


def test_a_whole_snapshot_of_this_command_line_is_usable(images: LabImages) -> None:
    nd = nodes.NodeDir(layout.LabNode.from_name("node1", "ondemand"))
    snap = saved(nd, images)
    assert snap.usable(images)
    assert snap.path.parent.name == "boot-snapshots" and snap.path.name == "ondemand"
    snap.state.unlink()
    assert not snap.usable(images), "a snapshot without its machine state"


def test_another_image_variant_or_node_makes_it_stale(images: LabImages, tmp_path: Path) -> None:
    nd = nodes.NodeDir(layout.LabNode.from_name("node1", "ondemand"))
    snap = saved(nd, images)
    rebuilt = LabImages(tmp_path / "images" / "two", images.kernel, images.initrd, images.abi)
    assert not snap.usable(rebuilt)
    stock = boot_snapshots.BootSnapshot(nodes.NodeDir(layout.LabNode.from_name("node1", "stock")))
    assert not stock.usable(images), "each variant has its own"
    other = boot_snapshots.BootSnapshot(
        nodes.NodeDir(layout.LabNode.from_name("node2", "ondemand"))
    )
    other.path.parent.mkdir(parents=True)
    shutil.copytree(snap.path, other.path)
    assert not other.usable(images), "another node's name, address and ssh port"
    assert snap.usable(images)
    snap.discard()
    assert not snap.path.exists()
