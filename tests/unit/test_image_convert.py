"""apull-image-build convert against a real registry: reproducible digests, and every file of
the converted layers compared with the source layer tars (each EROFS mounted, then all of
them stacked with overlayfs)."""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import pytest

from apull.image.cli import main
from apull.image.convert import ConvertError, ConvertOptions, convert
from apull.lab import test_image
from apull.registry.client import Blob
from apull_node.image import format as fmt
from apull_node.image.chunks import ChunkTable, ChunkVerifyError, verify_range
from apull_node.image.oci import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    sha256_digest,
)
from apull_node.image.reference import parse_reference

CAP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REPO = "test/multi"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="converting needs root")


# -- building the source image ---------------------------------------------------------------


def entry(name, kind=tarfile.REGTYPE, data=b"", **attrs):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = attrs.pop("mtime", 1_600_000_000)
    for key, value in attrs.pop("xattrs", {}).items():
        info.pax_headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    return info, data


def make_tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def source_tars() -> list[bytes]:
    fractional, payload = entry("data/precise", data=b"nanoseconds")
    fractional.pax_headers["mtime"] = "1650000000.123456789"
    big = bytes(range(256)) * 64 * 40  # 640 KiB: real data blocks, several 4 KiB chunks
    base = [
        entry("./", tarfile.DIRTYPE, mode=0o755, mtime=1_500_000_000),
        entry("etc", tarfile.DIRTYPE),
        entry("etc/hostname", data=b"base\n"),
        entry("usr", tarfile.DIRTYPE),
        entry("usr/bin", tarfile.DIRTYPE, mtime=1_600_000_100),
        entry("usr/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755, uid=1234, gid=5678),
        entry("usr/bin/tool-link", tarfile.SYMTYPE, linkname="tool"),
        entry("usr/bin/tool-hard", tarfile.LNKTYPE, linkname="usr/bin/tool"),
        entry("usr/bin/ping", data=b"ping", mode=0o755, xattrs={"security.capability": CAP}),
        entry("data", tarfile.DIRTYPE, uid=33, gid=33, mode=0o750),
        entry("data/noted", data=b"note", xattrs={"user.note": b"hello", "user.bin": b"\x00\xff"}),
        entry("data/doomed", data=b"deleted by layer 2"),
        entry("data/big", data=big),
        entry("data/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        entry("data/fifo", tarfile.FIFOTYPE, mode=0o600),
        (fractional, payload),
        entry("cache", tarfile.DIRTYPE),
        entry("cache/old-1", data=b"hidden by the opaque dir"),
        entry("cache/sub", tarfile.DIRTYPE),
        entry("cache/sub/old-2", data=b"hidden too"),
        entry("gone", tarfile.DIRTYPE),
        entry("gone/file", data=b"whole dir deleted"),
    ]
    upper = [
        entry("data", tarfile.DIRTYPE, uid=33, gid=33, mode=0o750, mtime=1_600_000_200),
        entry("data/.wh.doomed", mtime=1_600_000_200),
        entry("cache", tarfile.DIRTYPE, mtime=1_600_000_200),
        entry("cache/.wh..wh..opq"),
        entry("cache/fresh", data=b"only file left in cache"),
        entry(".wh.gone"),
        entry("etc", tarfile.DIRTYPE),
        entry("etc/hostname", data=b"upper\n", mode=0o600),
    ]
    top = [entry("top", tarfile.DIRTYPE), entry("top/zstd", data=b"from a zstd layer")]
    return [make_tar(base), make_tar(upper), make_tar(top)]


def zstd(raw: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout


def push(registry, tag: str, tars: list[bytes], docker: bool = False) -> str:
    """Push an image of `tars`: OCI with gzip / plain / zstd layers, or Docker v2 (gzip)."""
    if docker:
        layers = [Blob(DOCKER_GZIP, gzip.compress(t, mtime=0)) for t in tars]
    else:
        top = Blob(OCI_ZSTD, zstd(tars[2])) if shutil.which("zstd") else Blob(OCI_TAR, tars[2])
        layers = [Blob(OCI_GZIP, gzip.compress(tars[0], mtime=0)), Blob(OCI_TAR, tars[1]), top]
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(t) for t in tars]},
    }
    config = Blob(DOCKER_CONFIG if docker else OCI_CONFIG, json.dumps(config_doc).encode())
    for blob in [*layers, config]:
        registry.push_blob(REPO, blob)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
        "annotations": {"org.opencontainers.image.title": "multi"},
    }
    raw = json.dumps(manifest).encode()
    return registry.push_manifest(REPO, tag, raw, manifest["mediaType"])


def push_index(registry, tag: str, amd64: str, other: str) -> str:
    """An index whose arm64 entry is listed first (another image), amd64 second."""
    entries = []
    for digest, arch in ((other, "arm64"), (amd64, "amd64")):
        size = len(_get(registry, f"manifests/{digest}", REPO, OCI_MANIFEST))
        platform = {"os": "linux", "architecture": arch}
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                        "platform": platform})  # fmt: skip
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    return registry.push_manifest(REPO, tag, raw, OCI_INDEX)


def _get(registry, suffix: str, repo: str = REPO, accept: str = "") -> bytes:
    url = f"http://{registry.address}/v2/{repo}/{suffix}"
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.read()


# -- models of a layer: from the tar, and from a mounted filesystem ------------------------


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]
    payload: object  # content sha256, symlink target or (major, minor)


ROOT_DEFAULT = Node("dir", 0o755, 0, 0, 0, (), None)
OPAQUE = ("trusted.overlay.opaque", b"y")


def tar_model(raw: bytes) -> tuple[dict[str, Node], list[set[str]]]:
    """What the layer should look like after the OCI -> overlayfs whiteout translation."""
    model: dict[str, Node] = {"": ROOT_DEFAULT}
    links: dict[str, set[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for m in tar.getmembers():
            path = "/".join(p for p in m.name.split("/") if p not in ("", "."))
            parent, _, base = path.rpartition("/")
            mtime = int(Decimal(m.pax_headers.get("mtime", m.mtime)) * 10**9)
            xattrs = tuple(
                sorted(
                    (k.removeprefix("SCHILY.xattr."), v.encode("utf-8", "surrogateescape"))
                    for k, v in m.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            if base == ".wh..wh..opq":
                node = model[parent]
                model[parent] = replace(node, xattrs=tuple(sorted((*node.xattrs, OPAQUE))))
            elif base.startswith(".wh."):
                whiteout = f"{parent}/{base[4:]}".lstrip("/")
                model[whiteout] = Node("chr", 0, m.uid, m.gid, mtime, (), (0, 0))
            elif m.islnk():
                model[path] = model[m.linkname]
                links.setdefault(m.linkname, {m.linkname}).add(path)
            else:
                if m.isdir():
                    kind, payload = "dir", None
                elif m.isreg():
                    kind = "file"
                    payload = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                elif m.issym():
                    kind, payload = "symlink", m.linkname
                elif m.ischr() or m.isblk():
                    kind, payload = ("chr" if m.ischr() else "blk"), (m.devmajor, m.devminor)
                else:
                    kind, payload = "fifo", None
                mode = 0o777 if m.issym() else m.mode & 0o7777
                model[path] = Node(kind, mode, m.uid, m.gid, mtime, xattrs, payload)
    return model, sorted(links.values(), key=sorted)


def fs_node(path: str) -> tuple[Node, int]:
    st = os.lstat(path)
    xattrs = tuple(
        sorted((n, os.getxattr(path, n, follow_symlinks=False))
               for n in os.listxattr(path, follow_symlinks=False))
    )  # fmt: skip
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        kind, payload = "dir", None
    elif stat.S_ISREG(mode):
        with open(path, "rb") as f:
            kind, payload = "file", hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(mode):
        kind, payload = "symlink", os.readlink(path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "chr" if stat.S_ISCHR(mode) else "blk"
        payload = (os.major(st.st_rdev), os.minor(st.st_rdev))
    else:
        kind, payload = "fifo", None
    node = Node(kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns, xattrs, payload)
    return node, st.st_ino


def fs_model(root: Path) -> tuple[dict[str, Node], list[set[str]]]:
    model: dict[str, Node] = {}
    by_inode: dict[int, set[str]] = {}
    for top, dirs, files in os.walk(root):
        for name in ["", *dirs, *files] if top == str(root) else [*dirs, *files]:
            full = os.path.join(top, name) if name else top
            rel = os.path.relpath(full, root)
            rel = "" if rel == "." else rel
            node, inode = fs_node(full)
            model[rel] = node
            if node.kind != "dir":
                by_inode.setdefault(inode, set()).add(rel)
    groups = [group for group in by_inode.values() if len(group) > 1]
    return model, sorted(groups, key=sorted)


def merged_model(models: list[dict[str, Node]]) -> dict[str, Node]:
    """OCI layer semantics: each layer's whiteouts and opaque dirs hide what is below."""
    merged: dict[str, Node] = {}
    for model in models:
        for path, node in model.items():
            hide_children = node.kind == "dir" and OPAQUE in node.xattrs
            hide_self = node.kind == "chr" and node.payload == (0, 0)
            if hide_self or hide_children:
                prefix = f"{path}/" if path else ""
                for old in [p for p in merged if p.startswith(prefix) or p == path]:
                    if hide_self or old != path:
                        del merged[old]
        for path, node in model.items():
            if not (node.kind == "chr" and node.payload == (0, 0)):
                xattrs = tuple(x for x in node.xattrs if not x[0].startswith("trusted.overlay."))
                merged[path] = replace(node, xattrs=xattrs)
    return merged


# -- mounting ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 1


def sys_mount(source: str, target: Path, fstype: str, data: str = "") -> None:
    """mount(2) directly: a regular file as an EROFS source needs no loop device (6.12+)."""
    rc = _libc.mount(source.encode(), str(target).encode(), fstype.encode(), MS_RDONLY,
                     data.encode() or None)  # fmt: skip
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


@contextlib.contextmanager
def mounted(stack: contextlib.ExitStack, source: str, target: Path, fstype: str, data=""):
    target.mkdir(parents=True, exist_ok=True)
    sys_mount(source, target, fstype, data)
    stack.callback(lambda: _libc.umount2(str(target).encode(), 0))
    yield target


# -- fixtures -------------------------------------------------------------------------------


def options(registry, source: str, target: str, **extra) -> ConvertOptions:
    return ConvertOptions(
        source=parse_reference(f"{registry.address}/{source}"),
        target=parse_reference(f"{registry.address}/{target}"),
        source_insecure=True,
        target_insecure=True,
        **extra,
    )


@pytest.fixture(scope="module")
def multi(registry):
    tars = source_tars()
    amd64 = push(registry, "oci", tars)
    push(registry, "docker", tars, docker=True)
    busybox = test_image.push(registry)
    # The busybox manifest must be in REPO too for the index to reference it.
    raw = _get(registry, f"manifests/{busybox}", test_image.REPO, OCI_MANIFEST)
    config, layer = test_image.build()
    for blob in (config, layer):
        registry.push_blob(REPO, blob)
    registry.push_manifest(REPO, "busybox", raw, OCI_MANIFEST)
    push_index(registry, "index", amd64, busybox)
    return tars


def fetch_blob(registry, digest: str, repo: str) -> bytes:
    data = _get(registry, f"blobs/{digest}", repo)
    assert sha256_digest(data) == digest
    return data


def layer_descriptors(registry, repo: str, digest: str) -> list[dict]:
    manifest = json.loads(_get(registry, f"manifests/{digest}", repo, OCI_MANIFEST))
    return manifest["layers"]


# -- tests ----------------------------------------------------------------------------------


def test_converting_twice_gives_identical_digests(registry, multi, tmp_path):
    work_a, work_b = tmp_path / "a", tmp_path / "b"
    work_a.mkdir()
    work_b.mkdir()
    first = convert(options(registry, f"{REPO}:index", f"{REPO}:apull", chunk_size=4096,
                            work_dir=work_a))  # fmt: skip
    second = convert(options(registry, f"{REPO}:index", f"{REPO}:apull", chunk_size=4096,
                             work_dir=work_b))  # fmt: skip
    elsewhere = convert(options(registry, f"{REPO}:oci", "fresh/repo:x", chunk_size=4096))
    assert first.manifest_digest == second.manifest_digest == elsewhere.manifest_digest
    assert first.manifest == second.manifest
    assert [r.layer for r in first.layers] == [r.layer for r in second.layers]
    assert [r.table for r in first.layers] == [r.table for r in second.layers]
    assert first.chunk_tables_manifest == second.chunk_tables_manifest
    assert all(r.uploaded for r in first.layers) and not any(r.uploaded for r in second.layers)
    assert all(r.uploaded for r in elsewhere.layers)  # built again from scratch, same bytes
    assert len(first.layers) == 3  # the amd64 image of the index, not the busybox one
    assert os.listdir(work_a) == [] and os.listdir(work_b) == []


def test_manifest_format(registry, multi):
    result = convert(options(registry, f"{REPO}:oci", f"{REPO}:apull-oci", chunk_size=4096))
    manifest = json.loads(result.manifest)
    assert _get(registry, "manifests/apull-oci", REPO, OCI_MANIFEST) == result.manifest
    source = json.loads(_get(registry, "manifests/oci", REPO, OCI_MANIFEST))
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["digest"] == source["config"]["digest"]  # same diff_ids
    assert manifest["annotations"][fmt.IMAGE_FORMAT_VERSION] == fmt.FORMAT_VERSION
    assert manifest["annotations"][fmt.IMAGE_SOURCE_MANIFEST] == result.source_manifest
    assert manifest["annotations"]["org.opencontainers.image.title"] == "multi"
    diff_ids = [sha256_digest(t) for t in multi]
    for layer, src, diff_id in zip(manifest["layers"], source["layers"], diff_ids, strict=True):
        notes = layer["annotations"]
        assert layer["mediaType"] == fmt.LAYER_MEDIA_TYPE
        assert all(key.startswith("containerd.io/snapshot/apull.") for key in notes)
        assert notes[fmt.LAYER_SOURCE_DIGEST] == src["digest"]
        assert notes[fmt.LAYER_DIFF_ID] == diff_id
        assert notes[fmt.LAYER_BLOB_DIGEST] == layer["digest"]
        assert int(notes[fmt.LAYER_BLOB_SIZE]) == layer["size"]
        assert notes[fmt.LAYER_CHUNK_SIZE] == "4096" and notes[fmt.LAYER_BLOCK_SIZE] == "4096"
        # The chunk table verifies every range of the blob, and catches a flipped byte.
        blob = fetch_blob(registry, layer["digest"], REPO)
        table_raw = fetch_blob(registry, notes[fmt.LAYER_CHUNK_TABLE], REPO)
        assert len(table_raw) == int(notes[fmt.LAYER_CHUNK_TABLE_SIZE])
        table = ChunkTable.from_bytes(table_raw)
        assert table.data_size == len(blob) and len(blob) % 4096 == 0
        verify_range(table, 0, blob)
        last = len(blob) - 4096
        verify_range(table, last, blob[last:])
        bad = bytearray(blob[:4096])
        bad[1500] ^= 0x80
        with pytest.raises(ChunkVerifyError):
            verify_range(table, 0, bytes(bad))
    # The tables are kept referenced: referrer manifest at the OCI 1.1 fallback tag.
    index = json.loads(
        _get(registry, f"manifests/{result.manifest_digest.replace(':', '-')}", REPO, OCI_INDEX)
    )
    assert [m["digest"] for m in index["manifests"]] == [result.chunk_tables_manifest]
    referrer = json.loads(_get(registry, f"manifests/{result.chunk_tables_manifest}", REPO,
                               OCI_MANIFEST))  # fmt: skip
    assert referrer["subject"]["digest"] == result.manifest_digest
    assert referrer["artifactType"] == fmt.CHUNK_TABLES_ARTIFACT_TYPE
    tables = [layer["annotations"][fmt.LAYER_CHUNK_TABLE] for layer in manifest["layers"]]
    assert [t["digest"] for t in referrer["layers"]] == tables


def test_same_content_gives_same_layers_whatever_the_compression(registry, multi):
    oci = convert(options(registry, f"{REPO}:oci", f"{REPO}:apull-oci"))
    docker = convert(options(registry, f"{REPO}:docker", f"{REPO}:apull-docker"))
    assert [r.layer.digest for r in oci.layers] == [r.layer.digest for r in docker.layers]
    assert oci.manifest_digest != docker.manifest_digest  # their sources differ


def test_converted_files_are_identical_to_the_source(registry, multi, tmp_path):
    result = convert(options(registry, f"{REPO}:oci", f"{REPO}:apull-files"))
    expected = [tar_model(raw) for raw in multi]
    with contextlib.ExitStack() as stack:
        mounts = []
        for number, (layer, (want, want_links)) in enumerate(
            zip(result.layers, expected, strict=True)
        ):
            image = tmp_path / f"layer-{number}.erofs"
            image.write_bytes(fetch_blob(registry, layer.layer.digest, REPO))
            mount = stack.enter_context(
                mounted(stack, str(image), tmp_path / f"m{number}", "erofs")
            )
            got, got_links = fs_model(mount)
            assert sorted(got) == sorted(want), f"layer {number + 1}: paths differ"
            for path in want:
                assert got[path] == want[path], f"layer {number + 1}: {path!r} differs"
            assert got_links == want_links
            mounts.append(mount)
        # Stacked like the snapshotter will: overlayfs honours our whiteouts and opaque dirs.
        lower = ":".join(str(m) for m in reversed(mounts))
        merged = stack.enter_context(
            mounted(stack, "overlay", tmp_path / "merged", "overlay", f"lowerdir={lower}")
        )
        got, _ = fs_model(merged)
        want = merged_model([model for model, _ in expected])
        assert sorted(got) == sorted(want)
        for path in want:
            assert got[path] == want[path], f"merged: {path!r} differs"
        assert "data/doomed" not in got and "gone" not in got
        assert sorted(p for p in got if p.startswith("cache/")) == ["cache/fresh"]
        assert (merged / "etc/hostname").read_bytes() == b"upper\n"


def test_busybox_image_converts_file_for_file(registry, busybox_ref, tmp_path):
    result = convert(options(registry, f"{test_image.REPO}:latest", f"{test_image.REPO}:apull"))
    _config, layer = test_image.build()
    want, want_links = tar_model(gzip.decompress(layer.data))
    image = tmp_path / "busybox.erofs"
    image.write_bytes(fetch_blob(registry, result.layers[0].layer.digest, test_image.REPO))
    with contextlib.ExitStack() as stack:
        mount = stack.enter_context(mounted(stack, str(image), tmp_path / "m", "erofs"))
        got, got_links = fs_model(mount)
        assert got == want and got_links == want_links
        out = subprocess.run([str(mount / "bin/busybox"), "echo", "hi"], capture_output=True)
        assert out.stdout == b"hi\n"


def test_cli_prints_progress_and_the_digest_last(registry, busybox_ref, capsys):
    rc = main(["convert", "--source", busybox_ref, "--target", f"{registry.address}/cli/bb:v1",
               "--source-insecure", "--target-insecure", "--chunk-size", "64K"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0
    digest = out.strip().splitlines()[-1]
    assert digest.startswith("sha256:") and len(digest) == 71
    assert "layer 1/1" in err and "EROFS" in err and "uploaded" in err
    manifest = json.loads(_get(registry, "manifests/v1", "cli/bb", OCI_MANIFEST))
    assert manifest["layers"][0]["annotations"][fmt.LAYER_CHUNK_SIZE] == "65536"
    assert sha256_digest(_get(registry, "manifests/v1", "cli/bb", OCI_MANIFEST)) == digest


def test_errors_name_the_image_and_the_step(registry, multi):
    with pytest.raises(ConvertError, match=r"source .*test/multi:nope: read manifest: .*404"):
        convert(options(registry, f"{REPO}:nope", f"{REPO}:x"))
    with pytest.raises(ConvertError, match="already an apull image"):
        convert(options(registry, f"{REPO}:apull", f"{REPO}:y"))
    with pytest.raises(ConvertError, match="the same tag as the source"):
        convert(options(registry, f"{REPO}:oci", f"{REPO}:oci"))
    with pytest.raises(ConvertError, match="chunk size 1000"):
        convert(options(registry, f"{REPO}:oci", f"{REPO}:z", chunk_size=1000))


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--source", "Bad/Ref", "--target", "x/y:1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--source", "a/b", "--target", "x/y", "--chunk-size", "5000"])
    assert exc.value.code == 2
    assert "power of two" in capsys.readouterr().err
