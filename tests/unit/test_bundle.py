"""The node binaries: reproducible, self-contained, runnable with the system python3."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from apull.bundle.artefacts import BundleError, load_bundle, sha256_file
from apull.bundle.builder import ensure_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    ensure_bundle(out)
    return out


def test_manifest_matches_the_files(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert {b.name for b in bundle.binaries} == {"apulld", "apull-containerd-grpc"}
    for b in bundle.binaries:
        assert sha256_file(bundle.path_of(b)) == b.sha256
        assert b.mode == "0550"
        assert b.install_path == f"/usr/bin/{b.name}"


def test_a_rebuild_gives_the_same_bytes(bundle_dir: Path, tmp_path: Path) -> None:
    again, built = ensure_bundle(tmp_path / "again", force=True)
    assert built
    first = {b.name: b.sha256 for b in load_bundle(bundle_dir).binaries}
    assert {b.name: b.sha256 for b in again.binaries} == first


def test_an_up_to_date_bundle_is_reused(bundle_dir: Path) -> None:
    mtimes = {p.name: p.stat().st_mtime_ns for p in bundle_dir.iterdir()}
    _, built = ensure_bundle(bundle_dir)
    assert not built
    assert {p.name: p.stat().st_mtime_ns for p in bundle_dir.iterdir()} == mtimes


def test_a_tampered_binary_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in bundle_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with (copy / "apulld").open("ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="apulld"):
        load_bundle(copy)


def test_each_binary_holds_only_what_it_needs(bundle_dir: Path) -> None:
    with zipfile.ZipFile(bundle_dir / "apulld") as zf:
        names = zf.namelist()
    assert "__main__.py" in names
    assert any(n.startswith("apull/daemon/") for n in names)
    assert not any(n.startswith(("apull/snapshotter/", "grpc/", "apull/lab/")) for n in names)
    with zipfile.ZipFile(bundle_dir / "apull-containerd-grpc") as zf:
        names = zf.namelist()
    assert "apull/snapshotter/api/snapshots_pb2_grpc.py" in names
    assert any(n.startswith("grpc/_cython/") and n.endswith(".so") for n in names)
    assert any(n.startswith("google/protobuf/") for n in names)
    assert not any(n.startswith(("apull/daemon/", "apull/lab/", "ansible/")) for n in names)


def test_the_binaries_run_with_the_system_python(bundle_dir: Path, tmp_path: Path) -> None:
    """/usr/bin/python3 with no venv: what the nodes have (same Debian release)."""
    env = {"PATH": "/usr/bin:/bin", "APULL_RUNTIME_DIR": str(tmp_path / "runtime")}
    for name in ("apulld", "apull-containerd-grpc"):
        run = subprocess.run(
            [str(bundle_dir / name), "--help"], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        assert "--config" in run.stdout
    unpacked = list((tmp_path / "runtime").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in unpacked] == ["apull-containerd-grpc"]
    assert (unpacked[0] / ".complete").exists()


def test_manifest_is_json_with_a_fingerprint(bundle_dir: Path) -> None:
    data = json.loads((bundle_dir / "manifest.json").read_text())
    assert len(data["fingerprint"]) == 64
    assert data["python"] == "3.11"


def test_the_snapshotter_binary_carries_the_cri_client(bundle_dir: Path, tmp_path: Path) -> None:
    """`apull-containerd-grpc cri ...` runs the CRI image client (nodes have no crictl)."""
    with zipfile.ZipFile(bundle_dir / "apull-containerd-grpc") as zf:
        names = zf.namelist()
    assert "apull/cri/api/images_pb2_grpc.py" in names
    assert "apull/cri/client.py" in names
    env = {"PATH": "/usr/bin:/bin", "APULL_RUNTIME_DIR": str(tmp_path / "runtime")}
    binary = str(bundle_dir / "apull-containerd-grpc")
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
