"""A static containerd for lab nodes whose userland is older than Debian 12's .deb allows.

Debian 12's containerd .deb needs glibc >= 2.34; a Debian 11 node (glibc 2.31, python3.9)
has only containerd 1.4, older than apull's 1.6.14. The lab builds Debian 12's own source
package (1.6.20 with Debian's patches) with CGO off, in a build chroot copied from the node
rootfs, with Debian's Go and golang-*-dev packages (`apt-get build-dep containerd`), offline:
files/build-static-containerd.sh does the chroot work. The binaries are kept in the lab cache
under the source version, with a stamp of the inputs; a rebuild with the same inputs is
skipped. Two builds from the same inputs give the same bytes.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from apull.lab.image import debian_mirror
from apull.lab.modules import STAMP, chroot_mounts, digest, in_chroot, mounts_below
from apull.lab.run import LabError, Log, run_logged

SCRIPT = Path(__file__).parent / "files" / "build-static-containerd.sh"
BINARIES = ("containerd", "containerd-shim-runc-v2", "ctr")
CHROOT_WORK = "/var/tmp/apull-containerd-build"


def source_version(rootfs: Path) -> str:
    """Debian's version of the containerd package in rootfs (the source built)."""
    query = ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f", "${Version}"]
    version = subprocess.run(
        [*query, "containerd"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not version:
        raise LabError(f"containerd is not installed in {rootfs}")
    return version


def _prepare(rootfs: Path, buildroot: Path, key: str, log_file: Path, log: Log) -> None:
    """The build chroot: a copy of rootfs with containerd's build dependencies."""
    stamp = buildroot / STAMP
    if stamp.is_file() and stamp.read_text() == key:
        return
    if mounts_below(buildroot):
        raise LabError(f"something is mounted under {buildroot}; not replacing it")
    log(f"creating the containerd build chroot {buildroot} (about a minute)")
    shutil.rmtree(buildroot, ignore_errors=True)
    buildroot.parent.mkdir(parents=True, exist_ok=True)
    run_logged(["cp", "-a", "--reflink=auto", rootfs, buildroot], log_file, "copying the rootfs")
    resolv = buildroot / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    policy = buildroot / "usr/sbin/policy-rc.d"  # nothing installed may start a service
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (buildroot / "etc/apt/sources.list.d/apull-src.list").write_text(
        f"deb-src {debian_mirror()} bookworm main\n"
    )
    with chroot_mounts(buildroot, log_file):
        in_chroot(buildroot, ["apt-get", "update"], log_file, "apt-get update in the chroot")
        in_chroot(
            buildroot,
            ["apt-get", "build-dep", "-y", "--no-install-recommends", "containerd"],
            log_file,
            "installing containerd's build dependencies",
        )
        in_chroot(buildroot, ["apt-get", "clean"], log_file, "apt-get clean in the chroot")
    stamp.write_text(key)


def ensure_static_containerd(rootfs: Path, buildroot: Path, out_dir: Path, log: Log) -> Path:
    """The directory holding static containerd, containerd-shim-runc-v2 and ctr."""
    version = source_version(rootfs)
    key = digest(str(rootfs.resolve()), version, SCRIPT)
    target = out_dir / version
    if (target / STAMP).is_file() and (target / STAMP).read_text() == key:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = out_dir / f"build-{version}.log"
    started = time.monotonic()
    _prepare(rootfs, buildroot, digest(str(rootfs.resolve()), version), log_file, log)
    log(f"building a static containerd {version} (a few minutes, once)")
    work = buildroot / CHROOT_WORK.lstrip("/")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy2(SCRIPT, work / SCRIPT.name)
    with chroot_mounts(buildroot, log_file):
        in_chroot(
            buildroot,
            ["sh", "-c", f"cd {CHROOT_WORK} && apt-get source --download-only containerd"],
            log_file,
            "fetching containerd's source package",
        )
        dsc = sorted(work.glob("containerd_*.dsc"))
        if not dsc:
            raise LabError(f"no containerd_*.dsc in {work}; see {log_file}")
        in_chroot(
            buildroot,
            ["nice", "-n", "10", f"{CHROOT_WORK}/{SCRIPT.name}",
             f"{CHROOT_WORK}/{dsc[-1].name}", f"{CHROOT_WORK}/out"],
            log_file,
            "building containerd",
        )  # fmt: skip
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in BINARIES:
        shutil.copy2(work / "out" / name, tmp / name)
    shutil.rmtree(work, ignore_errors=True)
    (tmp / STAMP).write_text(key)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log(f"static containerd {version} built in {time.monotonic() - started:.0f} s")
    return target
