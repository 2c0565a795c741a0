"""Build the on-demand EROFS/cachefiles modules and the fs_ctl gate for the lab's nodes.

Debian's 6.1 kernel is built without CONFIG_CACHEFILES_ONDEMAND and CONFIG_EROFS_FS_ONDEMAND,
which EulerOS has. We rebuild just fs/cachefiles and fs/erofs of the very same Debian kernel
source, with those options on, against the node's own headers, inside a build chroot copied
from the node rootfs (so compiler and headers match the node, never the host). The chroot
work is done by files/build-ondemand-modules.sh; this module prepares the chroot, runs the
script, and keeps the results in out_dir/<abi>/ with a stamp so that a rebuild with the same
inputs is skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apull.lab.run import LabError, Log, run_logged

FILES = Path(__file__).parent / "files"
SCRIPT = FILES / "build-ondemand-modules.sh"
FS_CTL_SRC = FILES / "fs_ctl"
MODULES = ("cachefiles.ko", "erofs.ko", "fs_ctl.ko")
#: Where the script and its inputs/outputs live inside the build chroot.
CHROOT_WORK = "/var/tmp/apull-ondemand"
STAMP = ".apull-stamp"
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


def build_deps(abi: str, version: str) -> list[str]:
    """Packages the build chroot needs (see the header of build-ondemand-modules.sh)."""
    return [
        "build-essential",
        "xz-utils",
        "kmod",
        f"linux-headers-{abi}",
        f"linux-source-6.1={version}",
    ]


def node_kernel(rootfs: Path) -> tuple[str, str]:
    """(ABI, Debian version of linux-image-ABI) of the kernel installed in rootfs."""
    abis = sorted(p.name for p in (rootfs / "lib/modules").iterdir() if p.is_dir())
    if len(abis) != 1:
        raise LabError(f"expected one kernel in {rootfs}/lib/modules, found {abis}")
    abi = abis[0]
    query = ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f", "${Version}"]
    out = subprocess.run([*query, f"linux-image-{abi}"], capture_output=True, text=True)
    version = out.stdout.strip()
    if not version:
        raise LabError(f"linux-image-{abi} is not installed in {rootfs}")
    return abi, version


def digest(*parts: str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else part.encode())
        h.update(b"\0")
    return h.hexdigest()


def mounts_below(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    return [t for t in targets if t.startswith(prefix)]


@contextmanager
def chroot_mounts(root: Path, log_file: Path) -> Iterator[None]:
    """Mount /proc, /sys and /dev into root; unmount them all whatever happens."""
    mounted: list[Path] = []
    try:
        for cmd, target in (
            (["mount", "-t", "proc", "proc"], "proc"),
            (["mount", "-t", "sysfs", "sysfs"], "sys"),
            (["mount", "--bind", "/dev"], "dev"),
        ):
            run_logged([*cmd, root / target], log_file, f"mounting {root / target}")
            mounted.append(root / target)
        yield
    finally:
        for point in reversed(mounted):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", point], capture_output=True)
        left = mounts_below(root)
        if left:
            raise LabError(f"mounts left behind under {root}: {left}")


def in_chroot(root: Path, cmd: list[str], log_file: Path, what: str) -> None:
    run_logged(["chroot", root, *cmd], log_file, what, env=CHROOT_ENV)


def _prepare_buildroot(
    rootfs: Path, buildroot: Path, deps: list[str], log_file: Path, log: Log
) -> None:
    """(Re)create the build chroot from rootfs unless it is there with the same deps."""
    key = digest(str(rootfs.resolve()), *deps)
    stamp = buildroot / STAMP
    if stamp.is_file() and stamp.read_text() == key:
        log(f"build chroot {buildroot} is up to date")
        return
    if mounts_below(buildroot):
        raise LabError(f"something is mounted under {buildroot}; not replacing it")
    start = time.monotonic()
    log(f"creating build chroot {buildroot} from {rootfs}")
    shutil.rmtree(buildroot, ignore_errors=True)
    buildroot.parent.mkdir(parents=True, exist_ok=True)
    run_logged(["cp", "-a", "--reflink=auto", rootfs, buildroot], log_file, "copying the rootfs")
    resolv = buildroot / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    # Nothing installed in the chroot may start a service.
    policy = buildroot / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    with chroot_mounts(buildroot, log_file):
        in_chroot(buildroot, ["apt-get", "update"], log_file, "apt-get update in the chroot")
        install = ["apt-get", "install", "-y", "--no-install-recommends", *deps]
        in_chroot(buildroot, install, log_file, "installing the build deps")
        in_chroot(buildroot, ["apt-get", "clean"], log_file, "apt-get clean in the chroot")
    stamp.write_text(key)
    log(f"build chroot ready in {time.monotonic() - start:.0f} s")


def build_ondemand_modules(rootfs: Path, buildroot: Path, out_dir: Path, log: Log) -> Path:
    """Build cachefiles.ko, erofs.ko (on-demand) and fs_ctl.ko for rootfs's kernel.

    Returns out_dir/<abi>/, which holds the three modules. A second call with the same
    kernel and the same sources returns at once.
    """
    abi, version = node_kernel(rootfs)
    deps = build_deps(abi, version)
    dest = out_dir / abi
    key = digest(abi, version, *deps, SCRIPT, *sorted(FS_CTL_SRC.iterdir()))
    stamp = dest / STAMP
    out_dir.mkdir(parents=True, exist_ok=True)
    # One build at a time per out_dir: a second caller waits, then finds the result cached.
    with (out_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (
            stamp.is_file()
            and stamp.read_text() == key
            and all((dest / m).is_file() for m in MODULES)
        ):
            log(f"on-demand modules for {abi} ({version}) are cached in {dest}")
            return dest
        _build(abi, version, rootfs, buildroot, out_dir, log)
        dest.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        work_out = buildroot / CHROOT_WORK.lstrip("/") / "out"
        for name in MODULES:
            tmp = dest / f".{name}.tmp"
            shutil.copyfile(work_out / name, tmp)
            os.replace(tmp, dest / name)
        stamp.write_text(key)
    return dest


def _build(abi: str, version: str, rootfs: Path, buildroot: Path, out_dir: Path, log: Log) -> None:
    log_file = out_dir / f"build-{abi}.log"
    log_file.write_text(f"# on-demand modules for {abi}, linux-source-6.1 {version}\n")
    log(f"building on-demand modules for {abi} ({version}); log in {log_file}")
    _prepare_buildroot(rootfs, buildroot, build_deps(abi, version), log_file, log)

    work = buildroot / CHROOT_WORK.lstrip("/")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(FS_CTL_SRC, work / "fs_ctl")
    shutil.copy2(SCRIPT, work / SCRIPT.name)
    start = time.monotonic()
    with chroot_mounts(buildroot, log_file):
        script = [f"{CHROOT_WORK}/{SCRIPT.name}", abi, version]
        args = [f"{CHROOT_WORK}/out", f"{CHROOT_WORK}/fs_ctl"]
        in_chroot(buildroot, ["bash", *script, *args], log_file, "building the modules")
    log(f"modules built in {time.monotonic() - start:.0f} s")
