"""Unpacking layer tars into overlayfs-style trees, and building EROFS from them."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from apull.image.layer_to_erofs import build_erofs, layer_uuid, newest_mtime
from apull.image.layer_unpack import LayerError, normalise_name, unpack_layer

CAP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep, VFS v2


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = attrs.pop("mtime", 1_600_000_000)
    xattrs = attrs.pop("xattrs", {})
    for key, value in attrs.items():
        setattr(info, key, value)
    for key, value in xattrs.items():
        info.pax_headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    return info, data


def make_tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def unpack(tmp_path: Path, entries, compress=None) -> tuple[Path, object]:
    raw = make_tar(entries)
    blob = tmp_path / "layer.blob"
    blob.write_bytes(compress(raw) if compress else raw)
    tree = tmp_path / "tree"
    tree.mkdir()
    stats = unpack_layer(blob, tree)
    assert stats.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert stats.tar_size == len(raw)
    return tree, stats


def test_whiteouts_become_overlayfs_whiteouts(tmp_path):
    tree, stats = unpack(
        tmp_path,
        [
            entry("etc", tarfile.DIRTYPE),
            entry("etc/.wh.passwd", uid=7, gid=8, mtime=1_650_000_000),
            entry("opt/.wh..wh..opq"),  # the directory itself is not in the tar
            entry("opt/new", data=b"new"),
            entry(".wh..wh.plnk", tarfile.DIRTYPE),  # AUFS metadata: dropped
            entry("srv/.wh.x"),
            entry("srv/x", tarfile.DIRTYPE),  # recreated after its whiteout: opaque
            entry(".wh.var"),
            entry("var/.wh.log"),  # a whiteout inside a directory that was just deleted
        ],
        gzip.compress,
    )
    st = os.lstat(tree / "etc/passwd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (7, 8, 1_650_000_000 * 10**9)
    assert os.getxattr(tree / "opt", "trusted.overlay.opaque") == b"y"
    assert (tree / "opt/new").read_bytes() == b"new"
    assert os.getxattr(tree / "srv/x", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(tree / "etc")
    assert not (tree / ".wh..wh.plnk").exists() and not (tree / "etc/.wh.passwd").exists()
    # var was whited out, then used as a directory: a new (opaque) directory replaces it.
    assert stat.S_ISDIR(os.lstat(tree / "var").st_mode)
    assert os.getxattr(tree / "var", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(tree / "var/log").st_mode)
    assert (stats.whiteouts, stats.opaque_dirs) == (2, 3)


def test_own_entry_wins_over_its_whiteout(tmp_path):
    tree, _ = unpack(tmp_path, [entry("a", data=b"mine"), entry(".wh.a")])
    assert (tree / "a").read_bytes() == b"mine"


def test_ownership_modes_xattrs_links_devices_and_mtimes(tmp_path):
    tree, stats = unpack(
        tmp_path,
        [
            entry("./", tarfile.DIRTYPE, mode=0o751, mtime=5),
            entry("bin", tarfile.DIRTYPE, mtime=1_000),
            entry("bin/su", data=b"x" * 5000, mode=0o4755, uid=1234, gid=5678),
            entry("bin/su-link", tarfile.LNKTYPE, linkname="bin/su"),
            entry("bin/sh", tarfile.SYMTYPE, linkname="su", uid=3, gid=4),
            entry("bin/ping", data=b"ping", xattrs={"security.capability": CAP}),
            entry("bin/noted", data=b"n", xattrs={"user.note": b"hello", "user.a": b"\xff\x00"}),
            entry("dev", tarfile.DIRTYPE, mode=0o700, uid=9, gid=9, mtime=2_000),
            entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
            entry("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660),
            entry("dev/fifo", tarfile.FIFOTYPE, mode=0o600),
            entry("caf\udce9", data=b"latin-1 name"),
        ],
    )
    su = os.lstat(tree / "bin/su")
    assert (su.st_uid, su.st_gid, stat.S_IMODE(su.st_mode)) == (1234, 5678, 0o4755)
    assert su.st_nlink == 2 and os.lstat(tree / "bin/su-link").st_ino == su.st_ino
    assert os.readlink(tree / "bin/sh") == "su"
    assert os.lstat(tree / "bin/sh")[4:6] == (3, 4)
    assert os.getxattr(tree / "bin/ping", "security.capability") == CAP
    assert os.getxattr(tree / "bin/noted", "user.a") == b"\xff\x00"
    assert os.getxattr(tree / "bin/noted", "user.note") == b"hello"
    null = os.lstat(tree / "dev/null")
    assert (
        stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    )
    assert stat.S_ISBLK(os.lstat(tree / "dev/sda").st_mode)
    assert stat.S_ISFIFO(os.lstat(tree / "dev/fifo").st_mode)
    root = os.lstat(tree)
    assert (stat.S_IMODE(root.st_mode), root.st_mtime_ns) == (0o751, 5 * 10**9)
    assert os.lstat(tree / "bin").st_mtime_ns == 1_000 * 10**9  # set after its children
    assert os.lstat(tree / "dev")[4:6] == (9, 9)
    assert (tree / os.fsdecode(b"caf\xe9")).read_bytes() == b"latin-1 name"
    assert stats.entries == 12


def test_fractional_pax_mtime_is_kept(tmp_path):
    info, data = entry("f", data=b"x")
    info.pax_headers["mtime"] = "1700000000.123456789"
    tree, _ = unpack(tmp_path, [(info, data)])
    assert os.lstat(tree / "f").st_mtime_ns == 1_700_000_000_123_456_789


def test_implicit_directories_get_defaults(tmp_path):
    tree, _ = unpack(tmp_path, [entry("a/b/c", data=b"c")])
    st = os.lstat(tree / "a/b")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o755, 0, 0)


def test_later_entries_replace_earlier_ones(tmp_path):
    tree, _ = unpack(
        tmp_path,
        [
            entry("d", tarfile.DIRTYPE),
            entry("d/old", data=b"old"),
            entry("d", tarfile.DIRTYPE, mode=0o700),  # dir over dir: contents stay
            entry("f", tarfile.DIRTYPE),
            entry("f/inner", data=b"gone"),
            entry("f", data=b"file now"),  # file over dir: the dir goes
            entry("s", tarfile.SYMTYPE, linkname="/etc"),
            entry("s", data=b"plain"),
        ],
    )
    assert (tree / "d/old").read_bytes() == b"old"
    assert stat.S_IMODE(os.lstat(tree / "d").st_mode) == 0o700
    assert (tree / "f").read_bytes() == b"file now"
    assert not (tree / "s").is_symlink() and (tree / "s").read_bytes() == b"plain"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([entry("../evil", data=b"x")], r"'\.\.'"),
        ([entry("a/../../evil", data=b"x")], r"'\.\.'"),
        (
            [entry("link", tarfile.SYMTYPE, linkname="/tmp"), entry("link/evil", data=b"x")],
            "symlink in this layer",
        ),
        ([entry("h", tarfile.LNKTYPE, linkname="/etc/passwd")], "hard link"),
        (
            [
                entry("l", tarfile.SYMTYPE, linkname="/etc"),
                entry("h", tarfile.LNKTYPE, linkname="l/passwd"),
            ],
            "hard link",
        ),
    ],
)
def test_paths_stay_inside_the_tree(tmp_path, entries, message):
    with pytest.raises(LayerError, match=message):
        unpack(tmp_path, entries)
    assert not (tmp_path / "evil").exists()


def test_absolute_names_are_made_relative():
    assert normalise_name("/usr//bin/./x") == "usr/bin/x"
    assert normalise_name("./") == ""


def test_zstd_and_plain_layers(tmp_path):
    if shutil.which("zstd") is None:
        pytest.skip("zstd tool missing")
    raw = make_tar([entry("z", data=b"zstd!")])
    compressed = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True)
    blob = tmp_path / "blob"
    blob.write_bytes(compressed.stdout)
    (tmp_path / "t").mkdir()
    assert unpack_layer(blob, tmp_path / "t").tar_size == len(raw)
    assert (tmp_path / "t/z").read_bytes() == b"zstd!"


def test_garbage_is_a_layer_error(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(b"not a tar at all" * 100))
    (tmp_path / "t").mkdir()
    with pytest.raises(LayerError, match="not a valid layer tar"):
        unpack_layer(blob, tmp_path / "t")


def _tree(path: Path, names: list[str]) -> None:
    path.mkdir()
    for name in names:
        (path / name).write_text(name)
        os.setxattr(path / name, "user.k", name.encode())
        os.utime(path / name, (1_000 + len(name), 1_000 + len(name)))
    os.utime(path, (500, 500))


def test_erofs_builds_are_byte_identical_and_keep_mtimes(tmp_path):
    names = [f"file-{i:02d}" for i in range(30)]
    _tree(tmp_path / "a", names)
    _tree(tmp_path / "b", list(reversed(names)))  # other creation (readdir) order
    assert newest_mtime(tmp_path / "a") == 1_007
    digest = "sha256:" + "ab" * 32
    build_erofs(tmp_path / "a", tmp_path / "a.img", diff_id=digest)
    build_erofs(tmp_path / "b", tmp_path / "b.img", diff_id=digest)
    a, b = (tmp_path / "a.img").read_bytes(), (tmp_path / "b.img").read_bytes()
    assert a == b and len(a) % 4096 == 0
    assert layer_uuid(digest).replace("-", "") in a[1024:1200].hex()
    build_erofs(tmp_path / "a", tmp_path / "c.img", diff_id="sha256:" + "cd" * 32)
    assert (tmp_path / "c.img").read_bytes() != a  # another layer, another UUID
