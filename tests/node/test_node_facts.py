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


# -- the backend's reason is never cut --------------------------------------------------------

TAKEN_BACK = "fscache: /dev/cachefiles fd (bound on-demand) taken back from the previous apulld"


def test_apullds_reason_is_kept_whole():
    f = facts(fs_ctl={"erofs_enabled": "Y", "cachefiles_ondemand_enabled": "Y"})
    f.update(backend_source="apulld", backend_reasons=[TAKEN_BACK])
    why = nf.backend_why(f)
    # (it was cut at 70 characters: "... taken back from the previous apul")
    assert why == "apulld: /dev/cachefiles fd (bound on-demand) taken back from the previous apulld"
    f["backend_reasons"] = ["fscache: /dev/cachefiles bound on-demand to /var/lib/apull (tag a)"]
    assert nf.backend_why(f) == "apulld: /dev/cachefiles bound on-demand"


def test_a_failed_check_backend_keeps_its_whole_error(tmp_path):
    error = "apulld: backend fscache requested but unavailable: " + " ".join(
        f"word{n}" for n in range(80)
    )
    wrapper = tmp_path / "apulld"
    wrapper.write_text(f"#!/bin/sh\necho '{error}' >&2\nexit 1\n")
    wrapper.chmod(0o755)
    assert len(error) > 300
    assert nf.apulld_check_backend(str(wrapper)) == ("none", [error])


# -- which evidence decided the on-demand state -------------------------------------------------

RELEASE = "6.1.0-50-amd64"
UPDATES = f"/lib/modules/{RELEASE}/updates"
REBUILT = {
    "cachefiles": {"file": f"{UPDATES}/cachefiles.ko", "rebuilt": True, "ondemand": True,
                   "seen_in": "/proc/kallsyms"},
    "erofs": {"file": f"{UPDATES}/erofs.ko", "rebuilt": True, "ondemand": True,
              "seen_in": "/proc/kallsyms"},
}  # fmt: skip
CONFIG_N = {**dict.fromkeys(nf.KCONFIG, "n")}
CONFIG_Y = {**CONFIG_N, "CONFIG_CACHEFILES_ONDEMAND": "y", "CONFIG_EROFS_FS_ONDEMAND": "y"}
OPEN_GATE = {"erofs_enabled": "Y", "cachefiles_ondemand_enabled": "Y"}


def verdict(**over):
    f = facts(**over)
    f["ondemand_source"] = nf.ondemand_verdict(f)[1]
    f["ondemand_note"] = nf.ondemand_note(f)
    return f


@pytest.mark.parametrize(
    ("over", "ondemand", "source"),
    [
        ({"fs_ctl": OPEN_GATE}, "enabled", "fs_ctl gate"),
        ({"probe": "accepted"}, "supported", "bind probe"),
        ({"probe": "rejected: EINVAL"}, "unsupported", "bind probe"),
        ({"probe": "skipped: held by apulld[42]", "holder": {"pid": 42, "comm": "apulld"}},
         "in use by apulld", "apulld"),
        ({"probe": "skipped: disabled", "kconfig": CONFIG_Y}, "supported (kernel config)",
         "kernel config"),
        ({"probe": "skipped: disabled", "kconfig": CONFIG_N}, "unsupported", "kernel config"),
        ({"probe": "skipped: disabled", "kconfig": CONFIG_N, "modules": REBUILT},
         "supported (modules)", f"modules (rebuilt outside the kernel: {UPDATES}/cachefiles.ko, "
         f"{UPDATES}/erofs.ko)"),
        ({"probe": "skipped: disabled"}, "unsupported",
         "no evidence (no kernel config readable, skipped: disabled)"),
    ],
)  # fmt: skip
def test_the_source_that_decided_is_named(over, ondemand, source):
    f = verdict(**over)
    assert (f["ondemand"], f["ondemand_source"]) == (ondemand, source)


def test_a_config_without_ondemand_next_to_rebuilt_modules_is_explained():
    """The issue's node: CONFIG_CACHEFILES_ONDEMAND=n in the kernel config, on-demand enabled
    by the modules rebuilt in updates/ (with the fs_ctl gate)."""
    f = verdict(fs_ctl=OPEN_GATE, kconfig=CONFIG_N, modules=REBUILT)
    assert (f["backend"], f["ondemand"], f["ondemand_source"]) == (
        "fscache", "enabled", "fs_ctl gate")  # fmt: skip
    assert f["ondemand_note"] == (
        "the kernel config says CONFIG_CACHEFILES_ONDEMAND=n, CONFIG_EROFS_FS_ONDEMAND=n, but "
        "on-demand support comes from modules rebuilt outside the kernel "
        f"({UPDATES}/cachefiles.ko, {UPDATES}/erofs.ko): the config describes only the "
        "kernel's own modules; on-demand enabled, decided by: fs_ctl gate"
    )
    # The same contradiction without rebuilt modules is still said, with what decided.
    stock = {name: dict(info, rebuilt=False) for name, info in REBUILT.items()}
    f = verdict(probe="accepted", kconfig=CONFIG_N, modules=stock)
    assert f["ondemand_note"] == (
        "the kernel config says CONFIG_CACHEFILES_ONDEMAND=n, CONFIG_EROFS_FS_ONDEMAND=n, but "
        "on-demand is supported, decided by: bind probe (the config on disk does not describe "
        "the modules in use)"
    )
    # And the other way round: the config says y, the probe refuses.
    f = verdict(probe="rejected: EOPNOTSUPP", kconfig=CONFIG_Y)
    assert f["ondemand_note"] == (
        "the kernel config says CONFIG_CACHEFILES_ONDEMAND=y, CONFIG_EROFS_FS_ONDEMAND=y, but "
        "on-demand is unsupported, decided by: bind probe (rejected: EOPNOTSUPP)"
    )


def test_no_note_where_the_config_agrees_or_is_unreadable():
    assert verdict(fs_ctl=OPEN_GATE, kconfig=CONFIG_Y)["ondemand_note"] == ""
    assert verdict(probe="rejected: EINVAL", kconfig=CONFIG_N)["ondemand_note"] == ""
    assert verdict(fs_ctl=OPEN_GATE)["ondemand_note"] == ""  # no config readable


def test_modules_without_the_ondemand_code_outweigh_the_config():
    plain = {name: dict(info, ondemand=False, rebuilt=False) for name, info in REBUILT.items()}
    f = verdict(probe="skipped: disabled", kconfig=CONFIG_Y, modules=plain)
    assert (f["backend"], f["ondemand"]) == ("none", "unsupported")
    assert f["ondemand_source"] == f"modules ({UPDATES}/cachefiles.ko, {UPDATES}/erofs.ko)"
    assert f["ondemand_note"].startswith(
        "the kernel config says CONFIG_CACHEFILES_ONDEMAND=y, CONFIG_EROFS_FS_ONDEMAND=y, but "
        "on-demand is unsupported, decided by: modules ("
    )


def _module_tree(tmp_path):
    """/lib/modules/RELEASE as depmod leaves it after a rebuilt cachefiles.ko went to updates/
    (ahead of the stock one), erofs.ko.xz in kernel/ without the on-demand code."""
    import lzma

    base = tmp_path / RELEASE
    (base / "updates").mkdir(parents=True)
    (base / "kernel/fs/erofs").mkdir(parents=True)
    (base / "modules.dep").write_text(
        "kernel/fs/netfs/netfs.ko:\n"
        "updates/cachefiles.ko: kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/fs/erofs/erofs.ko.xz: kernel/fs/fscache/fscache.ko\n"
    )
    elf = b"\x7fELF" + b"\0" * 40
    (base / "updates/cachefiles.ko").write_bytes(
        elf + b"\0cachefiles_daemon_bind\0cachefiles_ondemand_init_object\0"
    )
    with lzma.open(base / "kernel/fs/erofs/erofs.ko.xz", "wb") as handle:
        handle.write(elf + b"\0erofs_fill_super\0erofs_fscache_register_fs_stub\0")
    return base


def test_module_files_are_read_for_the_ondemand_code(tmp_path):
    base = _module_tree(tmp_path)
    states = {"cachefiles": "available", "erofs": "available"}
    found = nf.module_support(states, RELEASE, str(tmp_path))
    cachefiles = f"{base}/updates/cachefiles.ko"
    assert found["cachefiles"] == {
        "file": cachefiles, "rebuilt": True, "ondemand": True, "seen_in": cachefiles,
    }  # fmt: skip
    # (a longer name that only starts like the function does not count)
    erofs = f"{base}/kernel/fs/erofs/erofs.ko.xz"
    assert found["erofs"] == {"file": erofs, "rebuilt": False, "ondemand": False, "seen_in": erofs}
    f = verdict(probe="skipped: disabled", kconfig=CONFIG_N, modules=found)
    assert f["ondemand"] == "unsupported"
    assert f["ondemand_source"] == f"modules (rebuilt outside the kernel: {cachefiles})"


def test_loaded_modules_are_read_from_kallsyms(tmp_path):
    _module_tree(tmp_path)
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(
        "0000000000000000 T cachefiles_ondemand_init_object\t[cachefiles]\n"
        "0000000000000000 t erofs_fscache_register_fs\t[erofs]\n"
    )
    found = nf.module_support({"cachefiles": "loaded", "erofs": "loaded"}, RELEASE,
                              str(tmp_path), str(kallsyms))  # fmt: skip
    assert [(i["ondemand"], i["seen_in"]) for i in found.values()] == [
        (True, str(kallsyms)), (True, str(kallsyms))]  # fmt: skip
    f = verdict(probe="skipped: no /dev/cachefiles", kconfig=CONFIG_N, modules=found)
    assert f["ondemand"] == "supported (modules)"
    assert f["ondemand_note"].startswith("the kernel config says CONFIG_CACHEFILES_ONDEMAND=n")
    kallsyms.write_text("0000000000000000 T cachefiles_daemon_bind\t[cachefiles]\n")
    found = nf.module_support({"cachefiles": "loaded", "erofs": "builtin"}, RELEASE,
                              str(tmp_path), str(kallsyms))  # fmt: skip
    assert [i["ondemand"] for i in found.values()] == [False, False]
    assert found["erofs"]["file"] is None  # built in: no file
