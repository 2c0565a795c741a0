"""Turn an unpacked layer tree into an EROFS image with Debian's mkfs.erofs, reproducibly.

What would vary between two builds of the same tree, and how it is pinned:
- The filesystem UUID: ``-U`` with a name-based UUID of the layer's diff ID, so the same
  content gives the same blob whichever compression the source layer used.
- The build time in the superblock (and the mtime of "compact" inodes, which store none):
  ``SOURCE_DATE_EPOCH`` set to the newest mtime in the tree, rounded up. erofs-utils then
  keeps every file's own mtime (it only clamps mtimes newer than that, and there are none).
  ``-T`` is not used: in erofs-utils 1.5 it forces every file to that one time.
- Directory and inode order: mkfs.erofs sorts directory entries by name, so the order in
  which the unpacker created them does not matter.
- Extended attributes are stored in the order the work directory's filesystem lists them;
  the unpacker sets them in name order, so one filesystem type gives one layout. Builds in
  work directories on different filesystem types (ext4 vs tmpfs) can differ.
Ownership is kept (no ``--all-root``) and nothing is compressed, so any byte range of the
blob is a plain slice of the filesystem. Block size is 4096 (see format.BLOCK_SIZE).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

from apull_node.image.format import BLOCK_SIZE

MKFS = "mkfs.erofs"
#: Namespace for the layer UUIDs (uuid5 of a URL naming this format).
LAYER_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://apull.invalid/erofs-layer/v1")
_NS = 1_000_000_000
SUPERBLOCK_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2


class ErofsBuildError(RuntimeError):
    """mkfs.erofs is missing or failed; the message has its output."""


def _mkfs() -> str:
    path = shutil.which(MKFS)
    if path is None:
        raise ErofsBuildError(f"{MKFS} is missing: apt-get install erofs-utils")
    return path


def _run_mkfs(arg: str) -> str:
    proc = subprocess.run(
        [_mkfs(), arg], capture_output=True, text=True, check=False, env=_env(None)
    )
    return proc.stdout + proc.stderr


@functools.cache
def _mkfs_help() -> str:
    return _run_mkfs("--help")


@functools.cache
def mkfs_version() -> str:
    """e.g. "mkfs.erofs 1.5". (1.5 has no --version, but prints its version first anyway.)"""
    match = re.search(r"mkfs\.erofs\s+(?:\(erofs-utils\)\s+)?(\d\S*)", _run_mkfs("--version"))
    return f"{MKFS} {match.group(1) if match else 'unknown'}"


def layer_uuid(diff_id: str) -> str:
    return str(uuid.uuid5(LAYER_UUID_NAMESPACE, diff_id))


def newest_mtime(tree: Path) -> int:
    """The newest mtime of anything in the tree, in whole seconds rounded up."""
    newest = os.lstat(tree).st_mtime_ns
    for top, dirs, files in os.walk(tree):
        for name in dirs + files:
            newest = max(newest, os.lstat(os.path.join(top, name)).st_mtime_ns)
    return max(0, -(-newest // _NS))


def _env(source_date_epoch: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    env["LC_ALL"] = "C"
    if source_date_epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
    return env


def check_superblock(image: Path) -> None:
    """The image starts with an EROFS superblock with BLOCK_SIZE blocks."""
    with open(image, "rb") as f:
        f.seek(SUPERBLOCK_OFFSET)
        raw = f.read(16)
    if len(raw) < 16 or struct.unpack_from("<I", raw)[0] != EROFS_MAGIC:
        raise ErofsBuildError(f"{image}: no EROFS superblock")
    if 1 << raw[12] != BLOCK_SIZE:
        raise ErofsBuildError(f"{image}: block size {1 << raw[12]}, need {BLOCK_SIZE}")


def build_erofs(tree: Path, output: Path, *, diff_id: str) -> None:
    """Write the EROFS image of `tree` to `output` (replaced)."""
    output.unlink(missing_ok=True)
    args = [_mkfs(), "--quiet", f"-U{layer_uuid(diff_id)}"]
    if re.search(r"^\s*-b#", _mkfs_help(), re.MULTILINE):
        args.append(f"-b{BLOCK_SIZE}")  # erofs-utils >= 1.6; 1.5 uses the page size
    elif os.sysconf("SC_PAGE_SIZE") != BLOCK_SIZE:
        raise ErofsBuildError(
            f"{mkfs_version()} builds page-sized blocks ({os.sysconf('SC_PAGE_SIZE')}) here "
            f"and has no -b; the format needs {BLOCK_SIZE}: use a newer erofs-utils"
        )
    args += [str(output), str(tree)]
    proc = subprocess.run(
        args, capture_output=True, text=True, check=False, env=_env(newest_mtime(tree))
    )
    if proc.returncode != 0:
        output.unlink(missing_ok=True)
        detail = (proc.stderr + proc.stdout).strip()[-2000:]
        raise ErofsBuildError(f"{MKFS} failed ({proc.returncode}): {detail}")
    check_superblock(output)
