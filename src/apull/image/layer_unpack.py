"""Unpack one layer tar into a directory the way overlayfs wants to see it as a lower layer.

Runs as root so that everything in the tar survives: numeric owners, modes (setuid and
friends), extended attributes (PAX ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``, e.g.
``security.capability``), hard links, symlinks, device nodes, FIFOs and mtimes (nanoseconds
when the PAX header has them).

OCI whiteouts become overlayfs whiteouts:
- ``DIR/.wh.NAME`` -> ``DIR/NAME`` as a character device 0:0 (mode 0, the whiteout
  entry's owner and mtime). A real NAME in the same layer wins over its whiteout; a real
  directory NAME after ``.wh.NAME`` is also made opaque (it replaces the lower one).
- ``DIR/.wh..wh..opq`` -> ``trusted.overlay.opaque=y`` on DIR.
- Other ``.wh..wh.*`` entries (AUFS bookkeeping) are dropped.
``trusted.overlay.*`` attributes carried in the tar itself are dropped: only the whiteout
translation sets them.

Paths are confined to the destination: absolute names are made relative, ``..`` is an
error, and so is an entry below a symlink the layer itself created. Later entries replace
earlier ones with the same name (a directory over a directory keeps its contents).
Directories nobody describes get mode 0755, owner 0:0 and mtime 0.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, BinaryIO, cast
from urllib.parse import unquote

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_COPY_SIZE = 1 << 20
_NS = 1_000_000_000


class LayerError(RuntimeError):
    """The layer cannot be unpacked; the message names the entry and what is wrong."""


@dataclass(frozen=True)
class UnpackStats:
    entries: int
    whiteouts: int
    opaque_dirs: int
    tar_size: int
    diff_id: str  # sha256 of the uncompressed tar


class _HashingReader:
    """Counts and hashes what tarfile reads (the diff ID is the sha256 of the whole tar)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.hasher = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hasher.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_COPY_SIZE):
            pass


@contextlib.contextmanager
def open_tar_stream(path: Path) -> Iterator[IO[bytes]]:
    """The uncompressed tar stream of a layer blob: gzip, zstd (via the zstd tool) or plain,
    told apart by their magic bytes."""
    with open(path, "rb") as probe:
        magic = probe.read(4)
    if magic[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as stream:
            yield cast(IO[bytes], stream)
    elif magic == b"\x28\xb5\x2f\xfd":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise LayerError("the layer is zstd-compressed and the zstd tool is missing")
        proc = subprocess.Popen(
            [zstd, "-d", "-c", "-q", "--", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
            proc.wait()
        if proc.returncode != 0:
            raise LayerError(f"zstd -d failed ({proc.returncode}): {err}")
    else:
        with open(path, "rb") as stream:
            yield stream


def unpack_layer(path: Path, dest: Path) -> UnpackStats:
    """Unpack the layer blob at `path` into the empty directory `dest`."""
    if os.geteuid() != 0:
        raise LayerError("unpacking layers needs root (owners, device nodes, trusted.* xattrs)")
    if any(dest.iterdir()):
        raise LayerError(f"{dest} is not empty")
    unpacker = _Unpacker(dest)
    try:
        with open_tar_stream(path) as raw:
            reader = _HashingReader(raw)
            with tarfile.open(
                fileobj=cast(IO[bytes], reader),
                mode="r|",
                encoding="utf-8",
                errors="surrogateescape",
            ) as tar:
                for member in tar:
                    unpacker.add(member, tar)
            reader.drain()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise LayerError(f"not a valid layer tar: {exc}") from exc
    unpacker.finish()
    return UnpackStats(
        entries=unpacker.entries,
        whiteouts=len(unpacker.whiteouts),
        opaque_dirs=len(unpacker.opaque),
        tar_size=reader.size,
        diff_id="sha256:" + reader.hasher.hexdigest(),
    )


def normalise_name(name: str) -> str:
    """Tar member name -> path relative to the layer root ("" for the root itself)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{name!r}: '..' in a layer path")
    return "/".join(parts)


def mtime_ns(member: tarfile.TarInfo) -> int:
    """The entry's mtime in nanoseconds (PAX gives fractions); before 1970 counts as 0."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        try:
            return max(0, int(Decimal(text) * _NS))
        except InvalidOperation as exc:
            raise LayerError(f"{member.name!r}: bad PAX mtime {text!r}") from exc
    return max(0, int(member.mtime) * _NS)


def member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """Extended attributes from the PAX header, trusted.overlay.* left out."""
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                found[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except binascii.Error as exc:
                raise LayerError(f"{member.name!r}: bad base64 in {key}") from exc
    return {k: v for k, v in found.items() if k and not k.startswith("trusted.overlay.")}


class _Unpacker:
    def __init__(self, root: Path) -> None:
        self.root = str(root)
        # Every real directory in the tree (relative path -> mtime to set at the end).
        self.dirs: dict[str, int] = {"": 0}
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()
        self.entries = 0
        os.chown(self.root, 0, 0)
        os.chmod(self.root, 0o755)

    def _full(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    # -- tree edits -----------------------------------------------------------------------

    def _ensure_dir(self, rel: str, name: str) -> None:
        """Make every component of `rel` a real directory (implicit ones get defaults)."""
        if rel in self.dirs:
            return
        parent = rel.rpartition("/")[0]
        self._ensure_dir(parent, name)
        full = self._full(rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise LayerError(f"{name!r}: {rel!r} is a symlink in this layer")
        if st is not None:
            if rel in self.whiteouts:
                self.opaque.add(rel)  # a new directory where the lower one was deleted
            self._remove(rel)
        os.mkdir(full, 0o755)
        self.dirs[rel] = 0

    def _remove(self, rel: str) -> None:
        """Remove whatever is at `rel` (a directory with everything below it)."""
        full = self._full(rel)
        if rel in self.dirs:
            shutil.rmtree(full)
            below = rel + "/"
            for table in (self.dirs, self.opaque, self.whiteouts):
                for key in [k for k in table if k == rel or k.startswith(below)]:
                    if isinstance(table, dict):
                        del table[key]
                    else:
                        table.discard(key)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
            self.whiteouts.discard(rel)

    # -- entries --------------------------------------------------------------------------

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self.entries += 1
        rel = normalise_name(member.name)
        parent, _, base = rel.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX):
            self._add_whiteout(member, parent, base)
            return
        if not rel:
            if not member.isdir():
                raise LayerError(f"{member.name!r}: the layer root is not a directory")
            self._set_meta(self.root, member, is_dir=True)
            self.dirs[""] = mtime_ns(member)
            return
        self._ensure_dir(parent, member.name)
        full = self._full(rel)
        if member.isdir():
            if rel in self.whiteouts:
                self.opaque.add(rel)  # replaces the lower directory the whiteout deleted
            if rel not in self.dirs:
                if os.path.lexists(full):
                    self._remove(rel)
                os.mkdir(full, 0o700)
            self._set_meta(full, member, is_dir=True)
            self.dirs[rel] = mtime_ns(member)
            return
        if member.islnk():
            self._add_hardlink(member, rel)
            return
        if os.path.lexists(full):
            self._remove(rel)
        if member.isreg():
            extracted = tar.extractfile(member)
            assert extracted is not None
            with extracted, _create(full) as out:
                shutil.copyfileobj(extracted, out, _COPY_SIZE)
        elif member.issym():
            os.symlink(member.linkname, full)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(full, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(full, 0o600)
        else:
            raise LayerError(f"{member.name!r}: unsupported tar entry type {member.type!r}")
        self._set_meta(full, member, is_dir=False)

    def _add_whiteout(self, member: tarfile.TarInfo, parent: str, base: str) -> None:
        self._ensure_dir(parent, member.name)
        if base == OPAQUE_MARKER:
            self.opaque.add(parent)
            return
        if base.startswith(WHITEOUT_PREFIX * 2):
            return  # AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): not part of the tree
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise LayerError(f"{member.name!r}: whiteout without a name")
        rel = f"{parent}/{name}" if parent else name
        full = self._full(rel)
        if os.path.lexists(full):
            if rel not in self.whiteouts:
                return  # this layer's own entry wins over the deletion of the lower one
            os.unlink(full)
        os.mknod(full, stat.S_IFCHR, os.makedev(0, 0))
        os.chown(full, member.uid, member.gid, follow_symlinks=False)
        os.chmod(full, 0)
        ns = mtime_ns(member)
        os.utime(full, ns=(ns, ns), follow_symlinks=False)
        self.whiteouts.add(rel)

    def _add_hardlink(self, member: tarfile.TarInfo, rel: str) -> None:
        target = normalise_name(member.linkname)
        target_parent = target.rpartition("/")[0]
        full_target = self._full(target)
        if (
            target_parent not in self.dirs  # also rejects targets below symlinks
            or target in self.dirs
            or not target
            or not os.path.lexists(full_target)
        ):
            raise LayerError(
                f"{member.name!r}: hard link to {member.linkname!r}, which is not a "
                "non-directory entry of this layer"
            )
        if target == rel:
            return
        full = self._full(rel)
        if os.path.lexists(full):
            self._remove(rel)
        # The link shares its target's inode: owner, mode, xattrs and mtime are the target's.
        os.link(full_target, full, follow_symlinks=False)

    def _set_meta(self, full: str, member: tarfile.TarInfo, *, is_dir: bool) -> None:
        os.chown(full, member.uid, member.gid, follow_symlinks=False)
        if not member.issym():
            os.chmod(full, stat.S_IMODE(member.mode))  # after chown, which drops setuid
        for name, value in sorted(member_xattrs(member).items()):
            try:
                os.setxattr(full, name, value, follow_symlinks=False)
            except OSError as exc:
                plain = member.isreg() or is_dir
                if exc.errno == errno.EPERM and name.startswith("user.") and not plain:
                    continue  # Linux allows user.* only on files and directories
                raise LayerError(f"{member.name!r}: cannot set xattr {name}: {exc}") from exc
        if not is_dir:
            ns = mtime_ns(member)
            os.utime(full, ns=(ns, ns), follow_symlinks=False)

    def finish(self) -> None:
        """Opaque markers and directory mtimes (writing into a directory changes its mtime)."""
        for rel in sorted(self.opaque):
            if rel in self.dirs:
                os.setxattr(self._full(rel), OPAQUE_XATTR, b"y", follow_symlinks=False)
        for rel, ns in self.dirs.items():
            os.utime(self._full(rel), ns=(ns, ns), follow_symlinks=False)


def _create(full: str) -> BinaryIO:
    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")
