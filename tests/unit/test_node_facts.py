"""The node_facts module's decisions (backend, on-demand state, problems) on given facts, and
its registry check against a real local HTTP server."""

from __future__ import annotations

import importlib.util
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

MODULE = (
    Path(__file__).resolve().parents[2]
    / "collections/ansible_collections/apull/deploy/plugins/modules/node_facts.py"
)
spec = importlib.util.spec_from_file_location("node_facts", MODULE)
assert spec and spec.loader
nf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nf)

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
    kconfig = {**dict.fromkeys(nf.KCONFIG), "CONFIG_EROFS_FS_BACKED_BY_FILE": "y"}
    assert facts(probe="rejected: EINVAL", kconfig=kconfig)["backend"] == "file-backed"
    assert facts(probe="rejected: EINVAL", kconfig=kconfig, fuse=False)["backend"] == "none"


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
