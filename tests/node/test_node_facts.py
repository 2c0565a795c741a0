"""The node_facts module (it runs on the nodes' python3, so here and under python3.9 too):
its decisions (backend, on-demand state, problems) on given facts, the
file-backend test against apulld's own on the same kernel files, asking a real apulld (its
ping, its --check-backend), and its registry check against a real local HTTP server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from node_support import MODULES, ansible_module
from test_apulld_api import Daemon

from apull_node.daemon.backend import NodePaths, choose_backend, probe_file

nf = ansible_module(MODULES / "node_facts.py")

PARAMS = {
    "block_size": 4096,
    "kernel_min": "5.10",
    "containerd_min": "1.6.14",
    "min_free_mb": 1024,
    "require_enabled": False,
}


def facts(**over):
    base = {
        "kernel": "6.1.0-50-amd64",
        "page_size": 4096,
        "containerd": "1.6.20",
        "kconfig": dict.fromkeys(nf.KCONFIG),
        "fuse": True,
        "erofs_registered": False,
        "fs_ctl": None,
        "erofs": "available",
        "cachefiles": "available",
        "holder": None,
        "probe": "accepted",
        "disk": [{"path": "/var/lib", "free_mb": 5000, "wanted": "/var/lib/containerd"}],
        "registry": {"address": "r:5000", "reachable": True, "detail": "HTTP 200"},
    }
    base.update(over)
    base["backend"], base["ondemand"] = nf.backend(base, PARAMS["block_size"])
    base["backend_reasons"] = nf.backend_reasons(base, PARAMS["block_size"])
    base["backend_source"] = "kernel facts"
    base["backend_why"] = nf.backend_why(base)
    return base


def whats(f, **params):
    return [p["what"] for p in nf.problems(f, {**PARAMS, **params})]


def test_fs_ctl_gate_decides_on_euleros():
    gated = facts(fs_ctl={"erofs_enabled": "N", "cachefiles_ondemand_enabled": "N"},
                  probe="rejected: EOPNOTSUPP")  # fmt: skip
    assert (gated["backend"], gated["ondemand"]) == ("fscache", "gated")
    assert whats(gated) == []
    assert whats(gated, require_enabled=True) == [
        "fs_ctl gate closed: erofs_enabled, cachefiles_ondemand_enabled",
        "module cachefiles not loaded",
        "module erofs not loaded",
    ]
    opened = facts(fs_ctl={"erofs_enabled": "Y", "cachefiles_ondemand_enabled": "Y"},
                   cachefiles="loaded", erofs="loaded")  # fmt: skip
    assert (opened["backend"], opened["ondemand"]) == ("fscache", "enabled")
    assert whats(opened, require_enabled=True) == []


def test_probe_decides_without_fs_ctl():
    assert facts(probe="accepted")["backend"] == "fscache"
    stock = facts(probe="rejected: EINVAL")
    assert (stock["backend"], stock["ondemand"]) == ("none", "unsupported")
    [problem] = nf.problems(stock, PARAMS)
    assert problem["what"] == (
        "no usable backend: fscache on-demand unsupported (rejected: EINVAL), "
        "no EROFS file-backed mounts"
    )
    assert problem["fix"] == nf.FIX_KERNEL


def test_kernel_config_counts_when_the_probe_cannot_run():
    kconfig = {**dict.fromkeys(nf.KCONFIG), "CONFIG_CACHEFILES_ONDEMAND": "y",
               "CONFIG_EROFS_FS_ONDEMAND": "y"}  # fmt: skip
    f = facts(probe="skipped: disabled", kconfig=kconfig)
    assert (f["backend"], f["ondemand"]) == ("fscache", "supported (kernel config)")


def test_file_backed_fallback_needs_the_kernel_option_and_fuse():
    kconfig = {**dict.fromkeys(nf.KCONFIG, "n"), "CONFIG_EROFS_FS_BACKED_BY_FILE": "y"}
    f = facts(probe="rejected: EINVAL", kconfig=kconfig)
    assert (f["backend"], f["backend_why"]) == ("file", "EROFS file-backed + /dev/fuse")
    assert f["backend_reasons"] == [
        "fscache: on-demand unsupported (rejected: EINVAL)",
        "file: /dev/fuse present, erofs available, CONFIG_EROFS_FS_BACKED_BY_FILE=y",
    ]
    assert facts(probe="rejected: EINVAL", kconfig=kconfig, fuse=False)["backend"] == "none"
    assert facts(probe="rejected: EINVAL", kconfig=kconfig, erofs="missing")["backend"] == "none"
    # no kernel config readable: apulld trusts 6.12 and newer, as here
    assert facts(probe="rejected: EINVAL", kernel="6.12.9-amd64")["backend"] == "file"
    none = facts(probe="rejected: EINVAL", kernel="6.12.9-amd64",
                 kconfig=dict.fromkeys(nf.KCONFIG, "n"))  # fmt: skip
    assert none["backend"] == "none"
    assert none["backend_why"] == "no on-demand (rejected: EINVAL), no EROFS file-backed"
    assert none["backend_reasons"][1:] == [
        "file: kernel 6.12.9-amd64 cannot mount EROFS from a file "
        "(CONFIG_EROFS_FS_BACKED_BY_FILE is not set)",
        "none: no cache backend available; image data cannot be served",
    ]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("erofs", [True, False])
@pytest.mark.parametrize("option", ["y", "n", None])
@pytest.mark.parametrize("release", ["6.1.0-50-amd64", "6.12.9-amd64"])
def test_file_backend_decided_as_apulld_decides(tmp_path, fuse, erofs, option, release):
    """node_facts' test and apulld's probe_file, on the same kernel files."""
    (tmp_path / "filesystems").write_text("nodev\tproc\n" + ("\terofs\n" if erofs else ""))
    (tmp_path / "modules" / release).mkdir(parents=True)
    config = tmp_path / "config"
    if option is not None:
        config.write_text(f"CONFIG_EROFS_FS_BACKED_BY_FILE={option}\n" if option == "y" else
                          "# CONFIG_EROFS_FS_BACKED_BY_FILE is not set\n")  # fmt: skip
    fuse_path = "/dev/null" if fuse else str(tmp_path / "no-fuse")  # a character device
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    paths = NodePaths(fuse=fuse_path, filesystems=str(tmp_path / "filesystems"),
                      modules=str(tmp_path / "modules"), kernel_configs=(str(config),),
                      release=release)  # fmt: skip
    apulld_ok, apulld_reason = probe_file(paths)
    kconfig = dict.fromkeys(nf.KCONFIG, None if option is None else "n")
    if option == "y":
        kconfig["CONFIG_EROFS_FS_BACKED_BY_FILE"] = "y"
    ours = facts(kernel=release, fuse=fuse, kconfig=kconfig, erofs_registered=erofs,
                 erofs="loaded" if erofs else "missing", probe="rejected: EINVAL")  # fmt: skip
    ok, reason = nf.file_backed(ours)
    assert ok == apulld_ok
    assert reason == apulld_reason.replace(fuse_path, "/dev/fuse")
    assert ours["backend"] == ("file" if apulld_ok else "none")


def test_page_size_must_match_the_block_size_for_fscache():
    f = facts(page_size=65536)
    assert f["backend"] == "none"
    assert "page size 65536 != EROFS block size 4096" in whats(f)[0]


def test_holders_of_dev_cachefiles():
    ours = facts(holder={"pid": 42, "comm": "apulld"}, probe="skipped: held by apulld[42]")
    assert (ours["backend"], ours["ondemand"]) == ("fscache", "in use by apulld")
    theirs = facts(holder={"pid": 7, "comm": "cachefilesd"}, probe="skipped: held by x")
    assert whats(theirs) == ["cachefilesd holds /dev/cachefiles (pid 7)"]
    assert nf.problems(theirs, PARAMS)[0]["fix"] == "systemctl disable --now cachefilesd"


@pytest.mark.parametrize(
    ("kernel", "containerd", "expected"),
    [
        ("5.10.0-60.18.0.50.h1.eulerosv2r11.aarch64", "1.6.14", []),
        ("4.19.90-2003.4.0.0036.oe1.x86_64", "1.6.20", ["kernel 4.19.90-2003.4.0.0036.oe1"
                                                       ".x86_64 is older than 5.10"]),
        ("6.1.0-50-amd64", "1.6.13", ["containerd 1.6.13 is older than 1.6.14"]),
        ("6.1.0-50-amd64", None, ["containerd is not installed"]),
    ],
)  # fmt: skip
def test_version_requirements(kernel, containerd, expected):
    assert whats(facts(kernel=kernel, containerd=containerd)) == expected


def test_disk_and_registry_problems():
    f = facts(
        disk=[{"path": "/var", "free_mb": 10, "wanted": "/var/lib/containerd-apull"}],
        registry={"address": "r:5000", "reachable": False, "detail": "Connection refused"},
    )
    assert whats(f) == [
        "10 MiB free under /var (< 1024 MiB)",
        "registry r:5000 unreachable: Connection refused",
    ]


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "reachable"), [(200, True), (401, True), (500, False)])
def test_registry_check_against_a_real_server(status, reachable):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.status = status  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        result = nf.registry_check(address, insecure=True)
        assert result["reachable"] is reachable
        assert result["detail"] == f"HTTP {status}"
    finally:
        server.shutdown()
        server.server_close()
    refused = nf.registry_check(address, insecure=True)
    assert refused["reachable"] is False
    assert nf.registry_check("", insecure=True)["reachable"] is None


def test_a_running_apulld_is_asked(tmp_path):
    apulld = Daemon(tmp_path, backend="file")
    apulld.start()
    try:
        status, _, ping = apulld.request("PUT", "/v1.0/apulld/ping")
        assert status == 200
        answer = nf.apulld_ping(apulld.address)
        assert answer is not None
        assert answer["backend"] == ping["backend"] == "file"
        assert answer["reasons"] == ping["reasons"]
    finally:
        apulld.stop()
        # It told the notify socket to keep its FUSE fd, so it left the mount for a successor.
        fuse = apulld.cache_dir.parent / "apulld" / "fuse"
        subprocess.run(["umount", "-l", str(fuse)], capture_output=True, check=False)
    assert nf.apulld_ping(apulld.address) is None  # nobody answers: not asked


def test_an_installed_apulld_is_asked_with_check_backend(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[apulld]\ncache_dir = "{tmp_path / "cache"}"\nbackend = "auto"\n')
    wrapper = tmp_path / "apulld"
    wrapper.write_text(
        f'#!/bin/sh\nexec {sys.executable} -m apull_node.daemon --config {config} "$@"\n'
    )
    wrapper.chmod(0o755)
    name, reasons = nf.apulld_check_backend(str(wrapper))
    expected = choose_backend("auto", str(tmp_path / "cache2"), "apull", hold=False)
    assert name == expected.name
    assert len(reasons) == len(expected.reasons)
    assert [r.split(":")[0] for r in reasons] == [r.split(":")[0] for r in expected.reasons]
    config.write_text('[apulld]\nbackend = "bogus"\n')
    name, [reason] = nf.apulld_check_backend(str(wrapper))
    assert name == "none" and "bogus" in reason
    assert nf.apulld_check_backend(str(tmp_path / "absent")) is None
