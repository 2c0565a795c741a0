"""`apull sync-bin` (the Fabric replacement for tools/sync_bin.sh) against the lab's nodes:
first sync, a resync that sends nothing, one changed file, --rollback, and an unreachable node
reported while the others complete. Wall times are printed (pytest -s)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, apull, run_on

from apull.bundle.builder import ensure_bundle
from apull.lab import layout

CLOSED_PORT = 2299  # nothing listens here: the unreachable node


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """v1 (the current build) and v2 (apulld differs, the snapshotter is the same)."""
    base = tmp_path_factory.mktemp("bundles")
    v1, _ = ensure_bundle(base / "v1")
    v2 = base / "v2"
    shutil.copytree(v1.directory, v2)
    with zipfile.ZipFile(v2 / "any" / "apulld", "a") as zf:
        zf.writestr("apull_node/VARIANT", "v2")
    manifest = json.loads((v2 / "manifest.json").read_text())
    for b in manifest["binaries"]:
        if b["name"] == "apulld":
            data = (v2 / "any" / "apulld").read_bytes()
            b["sha256"], b["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    return v1.directory, v2


def sha_of(node: layout.LabNode, path: str) -> str:
    out = run_on(node, f"sha256sum {path} 2>/dev/null || echo -").stdout.split()
    return out[0] if out else "-"


def manifest_sha(bundle: Path, name: str, platform: str = "x86_64-cp311") -> str:
    """The artefact's sha256 a lab node (Debian 12: x86-64, python3 3.11) gets."""
    binaries = json.loads((bundle / "manifest.json").read_text())["binaries"]
    return next(
        b["sha256"] for b in binaries if b["name"] == name and b["platform"] in ("any", platform)
    )


def timed_sync(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = apull("sync-bin", "--no-lab", *args, timeout=600)
    return result, time.monotonic() - started


def rows(out: str) -> dict[str, str]:
    """Summary table rows by node name."""
    return {m[1]: m[0] for m in re.finditer(r"^│ (\S+)\s+│.*$", out, re.M)}


def test_sync_resync_one_file_rollback(lab, bundles):
    v1, v2 = bundles
    for node in lab:  # a node that never had the binaries
        run_on(
            node, "rm -rf /usr/bin/apulld /usr/bin/apull-containerd-grpc /var/lib/apull/previous"
        )

    first, t_first = timed_sync("--bundle", str(v1))
    assert first.returncode == 0, first.stdout[-3000:]
    for node in lab:
        assert rows(first.stdout)[node.name].count("installed") == 2
        for name in ("apulld", "apull-containerd-grpc"):
            assert sha_of(node, f"/usr/bin/{name}") == manifest_sha(v1, name)
        assert run_on(node, "stat -c %a /usr/bin/apulld").stdout.strip() == "550"

    again, t_again = timed_sync("--bundle", str(v1))
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    assert all(r.count("unchanged") == 2 for r in rows(again.stdout).values())

    inodes = {n.name: run_on(n, "stat -c %i /usr/bin/apull-containerd-grpc").stdout for n in lab}
    one, t_one = timed_sync("--bundle", str(v2))
    assert one.returncode == 0, one.stdout[-3000:]
    for node in lab:
        row = rows(one.stdout)[node.name]
        assert row.count("updated") == 1 and row.count("unchanged") == 1
        assert sha_of(node, "/usr/bin/apulld") == manifest_sha(v2, "apulld")
        assert sha_of(node, "/var/lib/apull/previous/apulld") == manifest_sha(v1, "apulld")
        same = run_on(node, "stat -c %i /usr/bin/apull-containerd-grpc").stdout
        assert same == inodes[node.name], "the unchanged binary was rewritten"

    back, t_back = timed_sync("--rollback", "--bundle", str(v2))
    assert back.returncode == 0, back.stdout[-3000:]
    for node in lab:
        assert sha_of(node, "/usr/bin/apulld") == manifest_sha(v1, "apulld")
        assert "rolled back" in rows(back.stdout)[node.name]
    print(
        f"\nsync-bin to {len(lab)} nodes: first {t_first:.1f} s, no-change {t_again:.1f} s, "
        f"one file {t_one:.1f} s, rollback {t_back:.1f} s"
    )


def test_an_unreachable_node_is_named_and_the_others_complete(lab, bundles, tmp_path):
    """The legacy servers.txt path: the lab's nodes plus one that does not answer."""
    _, v2 = bundles
    servers = tmp_path / "servers.txt"
    lines = [f"127.0.0.1:{n.ssh_port}" for n in lab] + [f"127.0.0.1:{CLOSED_PORT}"]
    servers.write_text("# legacy format\n" + "\n".join(lines) + "\n")
    config = tmp_path / "config.txt"
    config.write_text(
        f"TARGET=servers\nSSH_USER=root\nSSH_KEY={layout.ssh_key_path()}\n"
        "KUBECONFIG_PATH=\nNODES=\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "apull.cli", "--config", str(config), "sync-bin", "--no-lab",
         "--servers", str(servers), "--bundle", str(v2)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "200"},
    )  # fmt: skip
    took = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    dead = f"127.0.0.1_{CLOSED_PORT}"
    assert re.search(rf"sync failed on 1 node\(s\): {dead}$", out, re.M), out[-2000:]
    table = rows(out)
    assert "FAILED" in table[dead]
    for node in lab:
        row = table[f"127.0.0.1_{node.ssh_port}"]
        assert "ok" in row and "updated" in row
        assert sha_of(node, "/usr/bin/apulld") == manifest_sha(v2, "apulld")
    print(f"\nsync-bin with one unreachable node: {took:.1f} s")


def test_fab_sync_bin_check_changes_nothing(lab, bundles):
    """`fab sync-bin` is the same task (check mode: nothing to send after the last test)."""
    result = subprocess.run(
        [str(ROOT / ".venv/bin/fab"), "sync-bin", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "sync done" in result.stdout
