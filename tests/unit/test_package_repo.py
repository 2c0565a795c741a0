"""The lab's package repository, built from the real cached on-demand modules (no VM here)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from apull.lab import image, layout, nodes, package_repo
from apull.lab.modules import node_kernel

CACHE = Path("/var/cache/apull-lab")
ABI = "6.1.0-50-amd64"
MODULES_DIR = CACHE / "modules" / ABI


def test_nodes_reach_the_repository_as_repo_lab(tmp_path, monkeypatch):
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path))
    images = image.LabImages(tmp_path, tmp_path / "vmlinuz", tmp_path / "initrd", ABI)
    cmd = nodes.qemu_command(nodes.NodeDir(layout.LabNode(1, "stock")), images)
    wan = cmd[cmd.index("-netdev") + 1]
    forward = f"guestfwd=tcp:10.0.2.101:80-cmd:socat - TCP:127.0.0.1:{layout.HOST_REPO_PORT}"
    assert forward in wan
    assert "10.0.2.101\trepo.lab\n" in image._hosts_file()
    assert layout.guest_repo_url() == "http://repo.lab/"


def iso_files(iso: Path) -> dict[str, bytes]:
    """The files in the root directory of an ISO image, read through its Joliet tree."""
    data = iso.read_bytes()
    sector = 2048
    for number in range(16, 64):
        desc = data[number * sector : (number + 1) * sector]
        if desc[0] == 255:
            break
        if desc[0] != 2 or desc[88:91] not in (b"%/@", b"%/C", b"%/E"):
            continue
        root = desc[156 : 156 + 34]
        start = int.from_bytes(root[2:6], "little") * sector
        listing = data[start : start + int.from_bytes(root[10:14], "little")]
        files: dict[str, bytes] = {}
        pos = 0
        while pos < len(listing):
            length = listing[pos]
            if length == 0:  # records do not cross sectors; the rest of this one is padding
                pos = (pos // sector + 1) * sector
                continue
            record = listing[pos : pos + length]
            raw_name = record[33 : 33 + record[32]]
            if raw_name not in (b"\0", b"\1"):
                extent = int.from_bytes(record[2:6], "little") * sector
                size = int.from_bytes(record[10:14], "little")
                files[raw_name.decode("utf-16-be").split(";")[0]] = data[extent : extent + size]
            pos += length
        return files
    raise AssertionError(f"{iso} has no Joliet directory tree")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not MODULES_DIR.is_dir():
        pytest.skip(f"no cached on-demand modules in {MODULES_DIR} (`apull lab up` builds them)")
    if os.geteuid() != 0:
        pytest.skip("the ISO is made in the build chroot, which needs root")
    _, source_version = node_kernel(CACHE / "rootfs")
    out = tmp_path_factory.mktemp("package-repo")
    messages: list[str] = []
    repo = package_repo.build_repo(
        CACHE / "buildroot", MODULES_DIR, ABI, source_version, out, messages.append
    )
    return out, repo, source_version


def test_the_deb_has_the_control_fields_the_kernel_role_expects(built):
    _, repo, source_version = built
    deb = repo / package_repo.deb_filename(ABI, source_version)
    assert deb.name == f"apull-ondemand-modules-{ABI}_{source_version}+apull1_amd64.deb"
    fields = dict(package_repo.deb_fields(deb))
    assert fields["Package"] == f"apull-ondemand-modules-{ABI}"
    assert fields["Version"] == f"{source_version}+apull1"
    assert fields["Architecture"] == "amd64"
    assert fields["Depends"] == f"linux-image-{ABI}"
    assert fields["Section"] == "kernel"
    assert "on-demand" in fields["Description"]
    assert "fs_ctl" in fields["Description"]
    assert "apull lab" in fields["Description"]


def test_the_deb_carries_the_modules_and_the_boot_time_load_of_fs_ctl(built, tmp_path):
    _, repo, source_version = built
    deb = repo / package_repo.deb_filename(ABI, source_version)
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True)
    files = {
        line.split()[-1].removeprefix(".")
        for line in listing.stdout.splitlines()
        if line.startswith("-")
    }
    assert files == {
        f"/lib/modules/{ABI}/updates/cachefiles.ko",
        f"/lib/modules/{ABI}/updates/erofs.ko",
        f"/lib/modules/{ABI}/updates/fs_ctl.ko",
        "/etc/modules-load.d/apull-fs-ctl.conf",
    }
    assert "root/root" in listing.stdout and "0/0" not in listing.stdout
    subprocess.run(["dpkg-deb", "-R", deb, tmp_path / "x"], check=True)
    assert (tmp_path / "x/etc/modules-load.d/apull-fs-ctl.conf").read_text() == "fs_ctl\n"
    ko = tmp_path / f"x/lib/modules/{ABI}/updates/cachefiles.ko"
    assert ko.read_bytes() == (MODULES_DIR / "cachefiles.ko").read_bytes()
    control = tmp_path / "x/DEBIAN"
    assert (control / "conffiles").read_text() == "/etc/modules-load.d/apull-fs-ctl.conf\n"
    for script in ("postinst", "postrm"):
        assert f"depmod -a {ABI}" in (control / script).read_text()
        assert os.access(control / script, os.X_OK)
    assert "remove" in (control / "postrm").read_text()


def test_the_index_describes_the_deb_as_it_is(built):
    _, repo, source_version = built
    deb = repo / package_repo.deb_filename(ABI, source_version)
    stanza = dict(
        line.split(": ", 1) for line in (repo / "Packages").read_text().splitlines() if ": " in line
    )
    assert stanza["SHA256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert stanza["Size"] == str(deb.stat().st_size)
    assert stanza["Filename"] == f"./{deb.name}"
    release = (repo / "Release").read_text()
    packages_sha = hashlib.sha256((repo / "Packages").read_bytes()).hexdigest()
    assert f" {packages_sha} {(repo / 'Packages').stat().st_size} Packages\n" in release
    assert (repo / "Packages.gz").is_file()


def test_the_iso_holds_the_same_repository(built):
    out, repo, _ = built
    files = iso_files(out / package_repo.ISO_NAME)
    assert set(files) == {p.name for p in repo.iterdir()}
    assert files["Packages"] == (repo / "Packages").read_bytes()


def test_a_second_build_with_the_same_inputs_does_nothing(built):
    out, repo, source_version = built
    outputs = [
        repo / package_repo.deb_filename(ABI, source_version),
        repo / "Release",
        out / package_repo.ISO_NAME,
        out / package_repo.STAMP,
    ]
    before = [p.stat().st_mtime_ns for p in outputs]
    stamp = (out / package_repo.STAMP).read_text()
    messages: list[str] = []
    again = package_repo.build_repo(
        CACHE / "buildroot", MODULES_DIR, ABI, source_version, out, messages.append
    )
    assert again == repo
    assert [p.stat().st_mtime_ns for p in outputs] == before
    assert (out / package_repo.STAMP).read_text() == stamp
    assert any("up to date" in m for m in messages)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_server_serves_the_repository_and_stops(built, tmp_path, monkeypatch):
    _, repo, _ = built
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path))
    port = _free_port()
    pidfile = tmp_path / "repo/server.pid"
    package_repo.ensure_repo_server(repo, port)
    try:
        assert pidfile.is_file()
        pid = pidfile.read_text()
        package_repo.ensure_repo_server(repo, port)  # already running: kept
        assert pidfile.read_text() == pid
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/Packages", timeout=10) as resp:
            assert resp.read() == (repo / "Packages").read_bytes()
    finally:
        package_repo.stop_repo_server()
    assert not pidfile.exists()
    assert "GET /Packages" in package_repo.server_log().read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/Packages", timeout=2)
