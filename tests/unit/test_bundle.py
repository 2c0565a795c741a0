"""The node binaries: reproducible, self-contained, runnable with the system python3."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from apull.bundle.artefacts import (
    NODE_ARCHES,
    NODE_PYTHONS,
    BundleError,
    NodePlatform,
    UnsupportedPlatform,
    load_bundle,
    sha256_file,
)
from apull.bundle.builder import ensure_bundle

#: This host's python3 (the nodes' of the same Debian release) and arch, as the bundle names them.
HOST_KEY = "x86_64-cp" + "".join(
    subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
)  # fmt: skip


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    ensure_bundle(out)
    return out


def test_manifest_matches_the_files(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.names == ("apull-containerd-grpc", "apulld")
    for b in bundle.binaries:
        assert sha256_file(bundle.path_of(b)) == b.sha256
        assert b.mode == "0550"
        assert b.install_path == f"/usr/bin/{b.name}"


def test_a_rebuild_gives_the_same_bytes(bundle_dir: Path, tmp_path: Path) -> None:
    again, built = ensure_bundle(tmp_path / "again", force=True)
    assert built
    # Per platform: every artefact, byte for byte.
    first = {(b.platform, b.name): b.sha256 for b in load_bundle(bundle_dir).binaries}
    assert {(b.platform, b.name): b.sha256 for b in again.binaries} == first
    assert len(first) == len(again.binaries) == 11


def test_an_up_to_date_bundle_is_reused(bundle_dir: Path) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in bundle_dir.rglob("*")}
    _, built = ensure_bundle(bundle_dir)
    assert not built
    assert {p: p.stat().st_mtime_ns for p in bundle_dir.rglob("*")} == mtimes


def test_a_tampered_binary_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    with (copy / "any" / "apulld").open("ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="apulld"):
        load_bundle(copy)


def test_every_platform_has_its_artefact_and_the_manifest_says_what_it_serves(
    bundle_dir: Path,
) -> None:
    data = json.loads((bundle_dir / "manifest.json").read_text())
    serves = {(b["name"], b["platform"]): b["serves"] for b in data["binaries"]}
    assert serves[("apulld", "any")] == {
        "arches": list(NODE_ARCHES), "pythons": list(NODE_PYTHONS), "glibc_min": "2.17",
    }  # fmt: skip
    for arch in NODE_ARCHES:
        for python in NODE_PYTHONS:
            key = f"{arch}-cp{python.replace('.', '')}"
            assert serves[("apull-containerd-grpc", key)] == {
                "arches": [arch], "pythons": [python], "glibc_min": "2.17",
            }  # fmt: skip
            with zipfile.ZipFile(bundle_dir / key / "apull-containerd-grpc") as zf:
                cores = [n for n in zf.namelist() if n.startswith("grpc/_cython/cygrpc")]
            # grpcio's native core, built for that CPython and architecture.
            assert cores and all(f"cpython-{key.split('-cp')[1]}" in n for n in cores), cores
            assert all(arch in n for n in cores), cores
    assert len(data["binaries"]) == 1 + len(NODE_ARCHES) * len(NODE_PYTHONS)


def test_a_node_gets_one_artefact_of_each_binary_or_a_message(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    chosen = bundle.for_node(NodePlatform("aarch64", "2.31", "3.9"))
    assert [(b.name, b.platform) for b in chosen] == [
        ("apull-containerd-grpc", "aarch64-cp39"), ("apulld", "any"),
    ]  # fmt: skip
    for node, has in [
        (NodePlatform("ppc64le", "2.36", "3.11"), "it has ppc64le, glibc 2.36, python3 3.11"),
        (NodePlatform("x86_64", "2.12", "3.11"), "it has x86_64, glibc 2.12, python3 3.11"),
        (NodePlatform("x86_64", "2.36", "3.8"), "it has x86_64, glibc 2.36, python3 3.8"),
        (NodePlatform("aarch64", "", ""), "it has aarch64, no glibc, no python3"),
    ]:
        with pytest.raises(UnsupportedPlatform) as err:
            bundle.for_node(node)
        assert str(err.value) == (
            f"no apull build runs on this node: {has}; "
            "supported: x86_64 or aarch64, glibc >= 2.17, python3 3.9-3.13"
        )


def test_each_binary_holds_only_what_it_needs(bundle_dir: Path) -> None:
    with zipfile.ZipFile(bundle_dir / "any" / "apulld") as zf:
        names = zf.namelist()
    assert "__main__.py" in names
    assert any(n.startswith("apull_node/daemon/") for n in names)
    assert "tomli/_parser.py" in names  # read the settings on python3 < 3.11
    assert not any(n.startswith(("apull_node/snapshotter/", "grpc/", "apull/")) for n in names)
    with zipfile.ZipFile(bundle_dir / HOST_KEY / "apull-containerd-grpc") as zf:
        names = zf.namelist()
    assert "apull_node/snapshotter/api/snapshots_pb2_grpc.py" in names
    assert any(n.startswith("grpc/_cython/") and n.endswith(".so") for n in names)
    assert any(n.startswith("google/protobuf/") for n in names)
    assert not any(n.startswith(("apull_node/daemon/", "apull/lab/", "ansible/")) for n in names)


def test_the_binaries_run_with_the_system_python(bundle_dir: Path, tmp_path: Path) -> None:
    """/usr/bin/python3 with no venv: what the nodes have (same Debian release)."""
    env = {"PATH": "/usr/bin:/bin", "APULL_RUNTIME_DIR": str(tmp_path / "runtime")}
    for name, key in (("apulld", "any"), ("apull-containerd-grpc", HOST_KEY)):
        run = subprocess.run(
            [str(bundle_dir / key / name), "--help"], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        assert "--config" in run.stdout
    unpacked = list((tmp_path / "runtime").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in unpacked] == ["apull-containerd-grpc"]
    assert (unpacked[0] / ".complete").exists()


def test_manifest_is_json_with_a_fingerprint(bundle_dir: Path) -> None:
    data = json.loads((bundle_dir / "manifest.json").read_text())
    assert len(data["fingerprint"]) == 64
    assert data["format"] == 2


def test_the_snapshotter_binary_carries_the_cri_client(bundle_dir: Path, tmp_path: Path) -> None:
    """`apull-containerd-grpc cri ...` runs the CRI image client (nodes have no crictl)."""
    with zipfile.ZipFile(bundle_dir / HOST_KEY / "apull-containerd-grpc") as zf:
        names = zf.namelist()
    assert "apull_node/cri/api/images_pb2_grpc.py" in names
    assert "apull_node/cri/client.py" in names
    env = {"PATH": "/usr/bin:/bin", "APULL_RUNTIME_DIR": str(tmp_path / "runtime")}
    binary = str(bundle_dir / HOST_KEY / "apull-containerd-grpc")
    run = subprocess.run([binary, "cri", "--help"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: apull-containerd-grpc cri ")
    missing = tmp_path / "no-containerd.sock"
    run = subprocess.run(
        [binary, "cri", "--address", str(missing), "pull", "example.invalid/x:1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert f"cannot reach containerd on {missing}" in run.stderr


def test_a_rebuild_removes_what_an_older_layout_left(tmp_path: Path) -> None:
    out = tmp_path / "old"
    out.mkdir()
    (out / "apulld").write_bytes(b"a binary of the one-platform layout")
    (out / "manifest.json").write_text('{"version": "0.1.0", "binaries": []}')
    with pytest.raises(BundleError, match="older bundle layout"):
        load_bundle(out)
    bundle, built = ensure_bundle(out)
    assert built and not (out / "apulld").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [".lock", "manifest.json"]
    assert load_bundle(out).fingerprint == bundle.fingerprint
