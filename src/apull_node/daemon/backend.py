"""Which cache backend this node can give apulld, and why.

fscache: EROFS over cachefiles on-demand. Proven only by doing it: open /dev/cachefiles,
  `dir`, `tag`, `bind ondemand` (the kernel config on disk may not match rebuilt modules).
file: file-backed EROFS on a FUSE file (Linux >= 6.12). Detected from /dev/fuse, erofs and
  CONFIG_EROFS_FS_BACKED_BY_FILE; served by file_backend.py (see SERVING.md).
none: neither; apulld still answers its API and says why.
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from apull_node.daemon.cachefiles_device import DEVICE_PATH, DeviceError, open_ondemand


class BackendUnavailableError(Exception):
    """The settings ask for a backend this node cannot provide."""


@dataclass(frozen=True)
class NodePaths:
    """Where the probes look; tests point these at temporary files."""

    cachefiles: str = DEVICE_PATH
    fuse: str = "/dev/fuse"
    filesystems: str = "/proc/filesystems"
    fs_ctl: str = "/sys/module/fs_ctl/parameters"
    modules: str = "/lib/modules"
    kernel_configs: tuple[str, ...] = ("/proc/config.gz", "/boot/config-{release}")
    release: str = field(default_factory=lambda: os.uname().release)


@dataclass
class BackendChoice:
    name: str  # fscache | file | none
    reasons: list[str]
    # The bound /dev/cachefiles fd when name is fscache and the device is held.
    device_fd: int | None = None
    # device_fd came from the previous apulld (fd store), already bound: not bound again.
    inherited: bool = False


def make_private_dir(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)
    return directory


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def probe_fscache(cache_dir: str, tag: str, paths: NodePaths) -> tuple[int | None, str]:
    """Bind an on-demand cache; return (device fd or None, reason)."""
    for param in ("cachefiles_ondemand_enabled", "erofs_enabled"):
        gate = Path(paths.fs_ctl) / param
        try:
            value = gate.read_text().strip()
        except OSError:
            continue
        if value != "Y":
            return None, f"fscache: fs_ctl gate {param}={value} (enable: echo 1 > {gate})"
    if not os.path.exists(paths.cachefiles):
        return None, f"fscache: {paths.cachefiles} does not exist (modprobe cachefiles)"
    try:
        make_private_dir(cache_dir)
        fd = open_ondemand(cache_dir, tag, paths.cachefiles)
    except (DeviceError, OSError, ValueError) as err:
        return None, f"fscache: {err}"
    return fd, f"fscache: {paths.cachefiles} bound on-demand to {cache_dir} (tag {tag})"


def _kernel_config(paths: NodePaths, option: str) -> str | None:
    """The option's value ('y', 'm', 'n' when not set), or None when no config is readable."""
    for pattern in paths.kernel_configs:
        path = pattern.format(release=paths.release)
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rt") as stream:
                    text = stream.read()
            else:
                text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(option + "="):
                return line.split("=", 1)[1].strip()
        return "n"
    return None


def _erofs_available(paths: NodePaths) -> bool:
    try:
        registered = Path(paths.filesystems).read_text().split()
    except OSError:
        registered = []
    if "erofs" in registered:
        return True
    for index in ("modules.dep", "modules.builtin"):
        try:
            text = (Path(paths.modules) / paths.release / index).read_text()
        except OSError:
            continue
        if "/erofs.ko" in text:
            return True
    return False


def _release_at_least(release: str, major: int, minor: int) -> bool:
    parts = release.split("-", 1)[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def probe_file(paths: NodePaths) -> tuple[bool, str]:
    """Can this kernel mount EROFS from a (FUSE-backed) regular file? (ok, reason)"""
    if not _is_char_device(paths.fuse):
        return False, f"file: {paths.fuse} missing (modprobe fuse)"
    if not _erofs_available(paths):
        return False, "file: erofs is neither in /proc/filesystems nor an installed module"
    option = "CONFIG_EROFS_FS_BACKED_BY_FILE"
    value = _kernel_config(paths, option)
    if value == "y":
        return True, f"file: {paths.fuse} present, erofs available, {option}=y"
    if value is None and _release_at_least(paths.release, 6, 12):
        return True, f"file: {paths.fuse} present, erofs available, no kernel config (>= 6.12)"
    found = "no kernel config readable" if value is None else f"{option} is not set"
    return False, f"file: kernel {paths.release} cannot mount EROFS from a file ({found})"


def is_cachefiles_device(fd: int, paths: NodePaths) -> bool:
    """Whether `fd` is an open /dev/cachefiles (same character device)."""
    try:
        held, device = os.fstat(fd), os.stat(paths.cachefiles)
    except OSError:
        return False
    return (
        stat.S_ISCHR(held.st_mode)
        and stat.S_ISCHR(device.st_mode)
        and (held.st_rdev == device.st_rdev)
    )


def choose_backend(
    backend: str,
    cache_dir: str,
    tag: str,
    paths: NodePaths | None = None,
    hold: bool = True,
    inherited_device: int | None = None,
) -> BackendChoice:
    """Pick the backend; with hold=False a bound device is closed again (a check only).
    `inherited_device`: the bound /dev/cachefiles fd an earlier apulld left in the fd store;
    used as it is (no dir/bind: the kernel keeps its session and mounted images), or closed
    when this apulld must not use fscache."""
    paths = paths or NodePaths()
    reasons: list[str] = []
    if inherited_device is not None:
        if backend in ("auto", "fscache") and is_cachefiles_device(inherited_device, paths):
            reasons.append(
                f"fscache: {paths.cachefiles} fd (bound on-demand) taken back from the "
                "previous apulld"
            )
            return BackendChoice("fscache", reasons, inherited_device, inherited=True)
        os.close(inherited_device)
        reasons.append(
            f"fscache: closed the inherited {paths.cachefiles} fd "
            + ("(not that device)" if backend in ("auto", "fscache") else f"(backend {backend})")
        )
    if backend in ("auto", "fscache"):
        fd, reason = probe_fscache(cache_dir, tag, paths)
        reasons.append(reason)
        if fd is not None:
            if not hold:
                os.close(fd)
                fd = None
            return BackendChoice("fscache", reasons, fd)
        if backend == "fscache":
            raise BackendUnavailableError(f"backend fscache requested but unavailable: {reason}")
    if backend in ("auto", "file"):
        ok, reason = probe_file(paths)
        reasons.append(reason)
        if ok:
            return BackendChoice("file", reasons)
        if backend == "file":
            raise BackendUnavailableError(f"backend file requested but unavailable: {reason}")
    if backend == "none":
        reasons.append("none: chosen by settings")
    else:
        reasons.append("none: no cache backend available; image data cannot be served")
    return BackendChoice("none", reasons)
