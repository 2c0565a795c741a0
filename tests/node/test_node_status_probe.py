"""The status probe reads what the node services wrote: apulld's blobs.json and chunk bitmaps,
the kernel's cache files, the snapshotter's metadata.db; all made here by the services' own
code (BlobRegistry, BlobState, MetaStore), and the probe run the way the controller runs it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from apull.status.probe import parse_report, probe_script
from apull_node.daemon.blob_registry import BlobRegistry, parse_blob_config
from apull_node.daemon.chunk_state import BlobState
from apull_node.report import node_status
from apull_node.snapshotter.diskusage import Usage
from apull_node.snapshotter.remote_layer import BLOB_ID_LABEL, CRI_IMAGE_REF_LABEL
from apull_node.snapshotter.store import Kind, MetaStore

CHUNK = 1 << 20


def _blob(registry: BlobRegistry, blob_id: str, digest: str, size: int, repo: str) -> None:
    registry.put(parse_blob_config({
        "blob_id": blob_id, "registry": "registry.lab:5000", "repo": repo,
        "digest": digest, "size": size, "fsid": "f" + blob_id[:8], "chunk_size": CHUNK,
        "chunk_table": "sha256:" + "c" * 64, "chunk_table_size": 64,
    }))  # fmt: skip


def test_images_and_the_part_of_each_fetched(tmp_path: Path) -> None:
    cache_dir = tmp_path / "containerd-apull" / "cachefiles"
    (cache_dir / "chunks").mkdir(parents=True)
    state = tmp_path / "containerd-apull" / "apulld"
    state.mkdir()
    registry = BlobRegistry(state / "blobs.json")
    a, b, c = "a" * 64, "b" * 64, "d" * 64
    # Layer a: 3.5 chunks, chunks 0 and 3 (the short tail) held by the file backend.
    _blob(registry, a, "sha256:" + a, 3 * CHUNK + CHUNK // 2, "test/app")
    held = BlobState.create(
        cache_dir / "chunks" / f"sha256-{a}-c{CHUNK}", CHUNK, 3 * CHUNK + CHUNK // 2
    )
    held.open()
    held.set_bit(0, True)
    held.set_bit(3, True)
    held.close()
    # Layer b: the kernel's cache file (fscache backend) holds 8 KiB of it.
    _blob(registry, b, "sha256:" + b, 10 * CHUNK, "test/app")
    kernel = cache_dir / "cache" / "Ierofs,fvol" / "@4a"
    kernel.mkdir(parents=True)
    with open(kernel / f"D{b}", "wb") as f:
        f.truncate(10 * CHUNK)
        f.seek(CHUNK)
        f.write(b"x" * 8192)
    # Layer c: nothing fetched; no snapshot names its image: grouped by repository.
    _blob(registry, c, "sha256:" + c, 2 * CHUNK, "test/other")
    store = MetaStore(tmp_path / "containerd-apull" / "metadata.db")
    with store.transaction() as tx:
        for name, blob in (("l1", a), ("l2", b)):
            tx.create(Kind.COMMITTED, name, "", {
                BLOB_ID_LABEL: blob, CRI_IMAGE_REF_LABEL: "registry.lab:5000/test/app:v1",
            }, Usage(0, 0))  # fmt: skip
    settings = {
        "cache_dir": str(cache_dir), "cache_size_limit_mb": 64,
        "snapshotter_root": str(tmp_path / "containerd-apull"),
    }  # fmt: skip
    cache, images = node_status.cache_and_images(settings)
    store.close()
    assert images == [
        {"image": "registry.lab:5000/test/app:v1", "layers": 2, "bytes": 13 * CHUNK + CHUNK // 2,
         "fetched": CHUNK + CHUNK // 2 + 8192},
        {"image": "registry.lab:5000/test/other", "layers": 1, "bytes": 2 * CHUNK, "fetched": 0},
    ]  # fmt: skip
    assert cache["limit_bytes"] == 64 << 20
    assert cache["bytes"] >= 8192  # allocated blocks, not file sizes (the files are sparse)
    assert cache["bytes"] < 10 * CHUNK


def test_an_unusable_bitmap_counts_nothing(tmp_path: Path) -> None:
    present = tmp_path / "present"
    present.write_bytes(b"NOTMAGIC" + bytes(40))
    assert node_status._bitmap_bytes(str(present)) is None
    assert node_status._bitmap_bytes(str(tmp_path / "missing")) is None


def test_fs_ctl_gate_values_and_its_absence(tmp_path: Path) -> None:
    params = tmp_path / "parameters"
    params.mkdir()
    (params / "erofs_enabled").write_text("1\n")
    (params / "cachefiles_ondemand_enabled").write_text("0\n")
    assert node_status.fs_ctl(str(params)) == {
        "cachefiles_ondemand_enabled": "0", "erofs_enabled": "1",
    }  # fmt: skip
    assert node_status.fs_ctl(str(tmp_path / "none")) is None


def test_settings_read_by_the_services_reader_or_defaults_said_so(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text('version = 1\n[apulld]\ncache_dir = "/srv/c/cachefiles"\n'
                    "cache_size_limit_mb = 512\n")  # fmt: skip
    found = node_status.read_settings(str(conf), apulld=str(tmp_path / "no-apulld"))
    assert (found["source"], found["cache_dir"], found["cache_size_limit_mb"]) == (
        str(conf), "/srv/c/cachefiles", 512)  # fmt: skip
    conf.write_text("[apulld]\nno_such_key = 1\n")
    refused = node_status.read_settings(str(conf), apulld=str(tmp_path / "no-apulld"))
    assert "no_such_key" in refused["error"] and refused["cache_dir"].endswith("/cachefiles")
    missing = node_status.read_settings(str(tmp_path / "absent.toml"))
    assert missing["source"].startswith("defaults (") and "error" not in missing


def test_the_controllers_script_runs_the_probe_with_python3(tmp_path: Path) -> None:
    """The script apull status sends, run by sh here: a report, the binaries hashed."""
    binary = tmp_path / "bin"
    binary.write_bytes(b"build 1")
    script = probe_script([str(binary), str(tmp_path / "absent")])
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = parse_report("motd noise\n" + done.stdout)
    assert report["binaries"] == {
        str(binary): hashlib.sha256(b"build 1").hexdigest(),
        str(tmp_path / "absent"): None,
    }
    assert report["host"]["python"].startswith("3.")
    assert set(report["services"]) == {
        "apulld.service", "apull-snapshotter.service", "containerd.service"}  # fmt: skip
    assert json.loads(json.dumps(report)) == report


def test_fscache_open_objects_count_what_apulld_says_it_wrote(tmp_path: Path) -> None:
    """An open object's cache file is not linked in the cache directory yet: the running
    apulld's written_bytes counts, capped at the blob's size; a linked file counts too."""
    cache_dir = tmp_path / "containerd-apull" / "cachefiles"
    cache_dir.mkdir(parents=True)
    (tmp_path / "containerd-apull" / "apulld").mkdir()
    registry = BlobRegistry(tmp_path / "containerd-apull" / "apulld" / "blobs.json")
    a, b = "e" * 64, "f" * 64
    _blob(registry, a, "sha256:" + a, 4 * CHUNK, "test/open")
    _blob(registry, b, "sha256:" + b, CHUNK, "test/open")
    settings = {"cache_dir": str(cache_dir), "cache_size_limit_mb": 1,
                "snapshotter_root": str(tmp_path / "containerd-apull")}  # fmt: skip
    cache, images = node_status.cache_and_images(settings, {a: CHUNK + 4096, b: 5 * CHUNK})
    assert cache["bytes"] == CHUNK + 4096 + 5 * CHUNK  # what apulld wrote, nothing linked yet
    assert images == [{"image": "registry.lab:5000/test/open", "layers": 2,
                       "bytes": 5 * CHUNK, "fetched": 2 * CHUNK + 4096}]  # fmt: skip
    _, none = node_status.cache_and_images(settings)
    assert none[0]["fetched"] == 0


def test_warnings_are_read_from_the_text_journald_stores_at_info() -> None:
    lines = [
        "2026-12-07T13:40:00+0000 node1 apulld[9]: INFO apulld.api: blob x added",
        "2026-12-07T13:40:01+0000 node1 apulld[9]: WARNING apulld.fetch: registry.lab:5000: "
        "timed out; trying again",
        "2026-12-07T13:40:02+0000 node1 apull-containerd-grpc[8]: ERROR apull-snapshotter.x: y",
        "2026-12-07T13:40:03+0000 node1 apulld[9]: a message mentioning WARNING in passing",
    ]
    assert node_status.warning_lines(lines) == lines[1:3]
