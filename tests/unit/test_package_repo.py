"""The lab's package repository, built from the real cached on-demand modules and kernel (no
VM here): the modules .deb, the whole-kernel .deb and RPM, the broken kernel, the index, the
ISO laid out like an OS DVD."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from apull.lab import image, kernel_packages, layout, nodes, package_repo
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


def iso_tree(iso: Path, into: Path) -> Path:
    """The ISO's files, extracted by xorriso."""
    subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(into)],
        capture_output=True, check=True,
    )  # fmt: skip
    return into


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not MODULES_DIR.is_dir():
        pytest.skip(f"no cached on-demand modules in {MODULES_DIR} (`apull lab up` builds them)")
    _, source_version = node_kernel(CACHE / "rootfs")
    out = tmp_path_factory.mktemp("package-repo")
    messages: list[str] = []
    repo = package_repo.build_repo(
        MODULES_DIR, ABI, source_version, out, messages.append, kernel=kernel_source()
    )
    return out, repo, source_version


def kernel_source() -> kernel_packages.KernelSource:
    _, source_version = node_kernel(CACHE / "rootfs")
    return kernel_packages.KernelSource(CACHE / "rootfs", ABI, source_version, MODULES_DIR)


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


def test_the_index_describes_each_deb_as_it_is(built):
    _, repo, _ = built
    stanzas = [
        dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        for block in (repo / "Packages").read_text().strip().split("\n\n")
    ]
    assert [s["Package"] for s in stanzas] == [
        f"apull-ondemand-modules-{ABI}",
        "apull-lab-kernel",
        "apull-lab-kernel-broken",
    ]
    for stanza in stanzas:
        deb = repo / stanza["Filename"].removeprefix("./")
        assert stanza["SHA256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
        assert stanza["Size"] == str(deb.stat().st_size)
    release = (repo / "Release").read_text()
    packages_sha = hashlib.sha256((repo / "Packages").read_bytes()).hexdigest()
    assert f" {packages_sha} {(repo / 'Packages').stat().st_size} Packages\n" in release
    assert (repo / "Packages.gz").is_file()


def test_the_iso_is_laid_out_like_an_os_dvd(built, tmp_path):
    out, repo, _ = built
    tree = iso_tree(out / package_repo.ISO_NAME, tmp_path / "iso")
    src = kernel_source()
    assert sorted(p.name for p in tree.iterdir()) == ["Packages", "debian", "repodata"]
    assert [p.name for p in (tree / "Packages").iterdir()] == [kernel_packages.rpm_filename(src)]
    assert (tree / "repodata/repomd.xml").is_file()
    primary = next((tree / "repodata").glob("*-primary.xml.gz"))
    assert b"<name>kernel</name>" in gzip.decompress(primary.read_bytes())
    debs = {p.name for p in repo.glob("*.deb")}
    assert {p.name for p in (tree / "debian").iterdir()} == debs | {
        "Packages",
        "Packages.gz",
        "Release",
    }
    assert (tree / "debian/Packages").read_bytes() == (repo / "Packages").read_bytes()


def _rpm_query(rpm: Path, fmt: str) -> str:
    return subprocess.run(
        ["rpm", "-qp", "--qf", fmt, str(rpm)], capture_output=True, text=True, check=True
    ).stdout


def test_the_kernel_rpm_is_the_kernel_with_the_on_demand_modules(built):
    _, repo, source_version = built
    src = kernel_source()
    rpm = repo / kernel_packages.rpm_filename(src)
    upstream, revision = source_version.split("-", 1)
    assert _rpm_query(rpm, "%{NAME} %{VERSION} %{RELEASE} %{ARCH}") == (
        f"kernel {upstream} {revision}.apull1 x86_64"
    )
    files = set(_rpm_query(rpm, "[%{FILENAMES}\\n]").split())
    assert f"/boot/vmlinuz-{ABI}" in files
    assert f"/lib/modules/{ABI}/updates/erofs.ko" in files
    assert f"/lib/modules/{ABI}/updates/fs_ctl.ko" in files
    assert f"/lib/modules/{ABI}/kernel/drivers/block/virtio_blk.ko" in files
    assert not any("/kernel/sound/" in f or "/drivers/gpu/" in f for f in files)
    assert not any(f.endswith("/modules.dep") for f in files)  # depmod writes it on the node
    # No /bin/sh requirement: nothing provides it in the rpm database of a dpkg userland.
    requires = _rpm_query(rpm, "[%{REQUIRENAME}\\n]").split()
    assert [r for r in requires if not r.startswith("rpmlib(")] == []
    scripts = _rpm_query(rpm, "%{POSTIN}\\n%{POSTUN}")
    assert f"depmod -a {ABI}" in scripts
    assert "/etc/kernel/postinst.d" in scripts and "kernel-install add" in scripts


def test_the_kernel_deb_stands_in_for_debians_and_runs_the_kernel_hooks(built, tmp_path):
    _, repo, source_version = built
    deb = repo / kernel_packages.deb_filename("apull-lab-kernel", f"{source_version}+apull1")
    fields = dict(package_repo.deb_fields(deb))
    assert fields["Provides"] == f"linux-image-{ABI}"
    assert fields["Conflicts"] == f"apull-ondemand-modules-{ABI}"
    subprocess.run(["dpkg-deb", "-R", deb, tmp_path / "x"], check=True)
    postinst = (tmp_path / "x/DEBIAN/postinst").read_text()
    assert f"run-parts --report --exit-on-error --arg={ABI}" in postinst
    vmlinuz = (tmp_path / f"x/boot/vmlinuz-{ABI}").read_bytes()
    assert vmlinuz == (CACHE / "rootfs/boot" / f"vmlinuz-{ABI}").read_bytes()


def test_the_broken_kernel_has_no_initramfs_and_no_modules(built):
    _, repo, source_version = built
    deb = repo / kernel_packages.deb_filename("apull-lab-kernel-broken", f"{source_version}+apull1")
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True)
    files = [line.split()[-1] for line in listing.stdout.splitlines() if line.startswith("-")]
    assert files == [f"./boot/vmlinuz-{ABI}-broken"]
    assert "DELIBERATELY BROKEN" in dict(package_repo.deb_fields(deb))["Description"]


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
        MODULES_DIR, ABI, source_version, out, messages.append, kernel=kernel_source()
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
