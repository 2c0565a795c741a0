"""A mounted EROFS layer's read-ahead, set through the backing-dev info the kernel names
(FS_IOC_GETFSSYSFSPATH), on a real file-backed EROFS mount; and its setting's bounds."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from apull.image.layer_to_erofs import build_erofs
from apull_node.daemon.backend import NodePaths, probe_file
from apull_node.service import mount_syscalls
from apull_node.snapshotter.read_ahead import read_ahead_kb, set_read_ahead, sysfs_name

needs_erofs = pytest.mark.skipif(not probe_file(NodePaths())[0], reason="no file-backed EROFS")


@pytest.fixture
def erofs_mount(tmp_path: Path) -> Iterator[Path]:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"x" * 100_000)
    image = tmp_path / "layer.erofs"
    build_erofs(tree, image, diff_id="sha256:" + hashlib.sha256(b"tree").hexdigest())
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount_syscalls.mount(str(image), str(mountpoint), "erofs", mount_syscalls.MS_RDONLY, "")
    try:
        yield mountpoint
    finally:
        mount_syscalls.unmount(str(mountpoint), True)


@needs_erofs
def test_the_read_ahead_of_an_erofs_mount_is_set(erofs_mount: Path) -> None:
    assert sysfs_name(erofs_mount).startswith("erofs/")
    assert read_ahead_kb(erofs_mount) == 128  # the kernel's default for file-backed EROFS
    assert set_read_ahead(erofs_mount, 768) is True
    assert read_ahead_kb(erofs_mount) == 768
    assert (erofs_mount / "file").read_bytes() == b"x" * 100_000


@needs_erofs
def test_other_filesystems_are_left_alone(tmp_path: Path, erofs_mount: Path) -> None:
    assert set_read_ahead(tmp_path, 768) is False  # not EROFS
    # A kernel that names no backing-dev info (here: one not under the root given).
    assert set_read_ahead(erofs_mount, 768, bdi_root=tmp_path) is False
    assert set_read_ahead(tmp_path / "gone", 768) is False  # unmounted and removed meanwhile
    assert read_ahead_kb(erofs_mount) == 128


def test_a_read_ahead_out_of_bounds_stops_the_snapshotter(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[snapshotter]\nlayer_read_ahead_kb = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "apull_node.snapshotter.main", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{config}: [snapshotter] layer_read_ahead_kb: -1 is not between 0 and 65536" in (
        result.stderr
    )
