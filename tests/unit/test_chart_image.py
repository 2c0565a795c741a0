"""The chart image's layers: what goes in, reproducibly (the base root and the push are
exercised by make integration-kube, which builds the image and runs it on the lab)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

from apull.chart import image


def _tree(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3").write_text("#!\n")
    (root / "bin").symlink_to("usr/bin")
    (root / "var/lib/apt/lists").mkdir(parents=True)
    (root / "var/lib/apt/lists/big").write_text("index")
    (root / "tmp").mkdir()
    (root / "tmp/junk").write_text("x")
    (root / "etc").mkdir()
    (root / "etc/.lock").write_text("")


def test_skipped_paths_keep_their_directory_but_not_its_content(tmp_path: Path) -> None:
    _tree(tmp_path)
    names = [n for n, _ in image._tree(tmp_path, skip=("var/lib/apt/lists/", "tmp/", "etc/.lock"))]
    assert "var/lib/apt/lists" in names and "var/lib/apt/lists/big" not in names
    assert "tmp" in names and "tmp/junk" not in names
    assert "etc" in names and "etc/.lock" not in names
    assert names == sorted(names)
    assert "bin" in names and "usr/bin/python3" in names


def _members(blob_data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob_data))) as tar:
        return tar.getmembers()


def test_a_layer_is_the_same_bytes_whatever_the_files_times(tmp_path: Path) -> None:
    _tree(tmp_path)
    first, first_id = image._layer(image._tree(tmp_path), mtime=image.FIXED_MTIME)
    os.utime(tmp_path / "usr/bin/python3", (1, 1))
    second, second_id = image._layer(image._tree(tmp_path), mtime=image.FIXED_MTIME)
    assert first.data == second.data and first_id == second_id
    members = {m.name: m for m in _members(first.data)}
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
    assert {m.uid for m in members.values()} == {0}
    assert {m.mtime for m in members.values()} == {image.FIXED_MTIME}
    # Times kept (the base layer): a changed time is a changed layer.
    kept, _ = image._layer(image._tree(tmp_path))
    os.utime(tmp_path / "usr/bin/python3", (2, 2))
    changed, _ = image._layer(image._tree(tmp_path))
    assert kept.data != changed.data


def test_the_python_layer_has_ansible_and_what_it_needs_and_no_dev_tools() -> None:
    names = {d.metadata["Name"].lower().replace("_", "-") for d in image.python_distributions()}
    assert {"ansible-core", "jinja2", "pyyaml", "cryptography", "resolvelib", "tomlkit"} <= names
    assert not names & {"pytest", "ruff", "mypy", "molecule", "ansible-lint"}


def test_the_pods_playbook_runs_with_a_strategy_the_image_can_load() -> None:
    """ansible.cfg names the Mitogen strategy (the suite's own runs), which the image does
    not carry: the pod's unit must name one that ships with ansible-core (a chart install
    failed in the lab with 'No module named ansible_mitogen' before this)."""
    from ansible.plugins.loader import strategy_loader

    from apull.chart import pod

    names = {d.metadata["Name"].lower() for d in image.python_distributions()}
    assert "mitogen" not in names
    strategy = pod.unit_env()["ANSIBLE_STRATEGY"]
    found = strategy_loader.find_plugin(strategy)
    assert found is not None and "/ansible/plugins/strategy/" in found, found
