"""apulld: backend choice, on this host and on synthetic node layouts."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apull_node.daemon.backend import (
    BackendUnavailableError,
    NodePaths,
    choose_backend,
    probe_file,
    probe_fscache,
)

HOST_HAS_NO_CACHEFILES = not os.path.exists("/dev/cachefiles") and os.path.exists("/dev/fuse")
host_only = pytest.mark.skipif(
    not HOST_HAS_NO_CACHEFILES, reason="expects a host with /dev/fuse and no /dev/cachefiles"
)


def apulld(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apull_node.daemon", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def node(
    tmp_path: Path, *, fuse: bool = True, erofs: str = "fs", config: str | None = "y"
) -> NodePaths:
    """A fake node: erofs registered ('fs'), only as a module ('module') or absent ('')."""
    (tmp_path / "proc").mkdir(parents=True)
    (tmp_path / "proc" / "filesystems").write_text(
        "nodev\tsysfs\n\text4\n" + ("\terofs\n" if erofs == "fs" else "")
    )
    modules = tmp_path / "modules" / "6.1.0-test"
    modules.mkdir(parents=True)
    if erofs == "module":
        (modules / "modules.dep").write_text("kernel/fs/erofs/erofs.ko.xz: kernel/lib/x.ko\n")
    configs: tuple[str, ...] = ()
    if config is not None:
        path = tmp_path / "config.gz"
        value = "CONFIG_EROFS_FS_BACKED_BY_FILE=y\n" if config == "y" else ""
        with gzip.open(path, "wt") as stream:
            stream.write("CONFIG_EROFS_FS=m\n" + value)
        configs = (str(path),)
    return NodePaths(
        cachefiles=str(tmp_path / "cachefiles"),
        # A character device that always exists, standing in for /dev/fuse.
        fuse="/dev/null" if fuse else str(tmp_path / "fuse"),
        filesystems=str(tmp_path / "proc" / "filesystems"),
        fs_ctl=str(tmp_path / "fs_ctl"),
        modules=str(tmp_path / "modules"),
        kernel_configs=configs,
        release="6.1.0-test",
    )


@host_only
def test_auto_on_this_host_is_file_with_reasons(tmp_path: Path) -> None:
    choice = choose_backend("auto", str(tmp_path / "cache"), "apulltest", hold=False)
    assert choice.name == "file"
    assert choice.device_fd is None
    assert choice.reasons[0] == "fscache: /dev/cachefiles does not exist (modprobe cachefiles)"
    assert choice.reasons[1].startswith("file: /dev/fuse present, erofs available")
    # Probing fscache stopped before touching the cache dir.
    assert not (tmp_path / "cache").exists()


@host_only
def test_check_backend_cli_on_this_host(tmp_path: Path) -> None:
    result = apulld("--check-backend", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "file"
    assert "- fscache: /dev/cachefiles does not exist (modprobe cachefiles)" in lines
    assert any(line.startswith("- file: /dev/fuse present") for line in lines)


@host_only
def test_explicit_fscache_on_this_host_fails_clearly(tmp_path: Path) -> None:
    started = time.monotonic()
    result = apulld(
        "--backend",
        "fscache",
        "--config",
        str(tmp_path / "none.toml"),
        "--address",
        str(tmp_path / "s.sock"),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.returncode == 1
    assert "backend fscache requested but unavailable" in result.stderr
    assert "/dev/cachefiles does not exist" in result.stderr
    assert not (tmp_path / "s.sock").exists()
    assert time.monotonic() - started < 20
    check = apulld("--check-backend", "--backend", "fscache", "--config", str(tmp_path / "n"))
    assert check.returncode == 1
    assert "/dev/cachefiles does not exist" in check.stderr


def test_fs_ctl_gate_closed_is_reported_first(tmp_path: Path) -> None:
    paths = node(tmp_path)
    gate = Path(paths.fs_ctl)
    gate.mkdir()
    (gate / "cachefiles_ondemand_enabled").write_text("N\n")
    (gate / "erofs_enabled").write_text("Y\n")
    fd, reason = probe_fscache(str(tmp_path / "cache"), "t", paths)
    assert fd is None
    assert reason.startswith("fscache: fs_ctl gate cachefiles_ondemand_enabled=N")
    assert "echo 1 >" in reason


def test_file_backend_needs_fuse_erofs_and_file_backed_mounts(tmp_path: Path) -> None:
    assert probe_file(node(tmp_path / "a"))[0] is True
    assert probe_file(node(tmp_path / "b", erofs="module"))[0] is True
    ok, reason = probe_file(node(tmp_path / "c", fuse=False))
    assert (ok, reason) == (False, f"file: {tmp_path / 'c' / 'fuse'} missing (modprobe fuse)")
    ok, reason = probe_file(node(tmp_path / "d", erofs=""))
    assert not ok
    assert "erofs is neither" in reason
    ok, reason = probe_file(node(tmp_path / "e", config="n"))
    assert not ok
    assert "CONFIG_EROFS_FS_BACKED_BY_FILE is not set" in reason


def test_file_backend_without_kernel_config_goes_by_release(tmp_path: Path) -> None:
    old = node(tmp_path / "old", config=None)
    assert probe_file(old) == (
        False,
        "file: kernel 6.1.0-test cannot mount EROFS from a file (no kernel config readable)",
    )
    new = NodePaths(**{**old.__dict__, "release": "6.12.9-amd64"})
    ok, reason = probe_file(new)
    assert ok
    assert "(>= 6.12)" in reason


def test_auto_falls_back_to_none_and_says_why(tmp_path: Path) -> None:
    paths = node(tmp_path, fuse=False)
    choice = choose_backend("auto", str(tmp_path / "cache"), "t", paths)
    assert choice.name == "none"
    assert [reason.split(":")[0] for reason in choice.reasons] == ["fscache", "file", "none"]
    assert choice.reasons[-1] == "none: no cache backend available; image data cannot be served"


def test_explicit_backends_that_the_node_lacks_are_errors(tmp_path: Path) -> None:
    paths = node(tmp_path, fuse=False)
    with pytest.raises(BackendUnavailableError, match=r"backend file requested .*/fuse missing"):
        choose_backend("file", str(tmp_path / "cache"), "t", paths)
    with pytest.raises(BackendUnavailableError, match="cachefiles does not exist"):
        choose_backend("fscache", str(tmp_path / "cache"), "t", paths)
    none = choose_backend("none", str(tmp_path / "cache"), "t", paths)
    assert (none.name, none.reasons) == ("none", ["none: chosen by settings"])
