"""One cached blob on disk: a sparse ``data`` file of the blob's size and a ``present``
file, a 32-byte header (magic, version, chunk size, blob size, chunk count; little-endian)
then a bitmap of the chunks that were verified and written to ``data``. Bits change one
byte at a time with pwrite; a torn update only costs a refetch, since chunks found on disk
are checked again before their first use (see chunk_cache)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

_HEADER = struct.Struct("<8sIIQQ")
_MAGIC = b"APULLCC\0"
_VERSION = 1
_FALLOC_PUNCH_HOLE = 0x02 | 0x01  # PUNCH_HOLE | KEEP_SIZE


class Table(Protocol):
    """What the cache needs of a chunk table (apull_node.image.chunks.ChunkTable, or one still
    being fetched: blob_source.PendingTable, whose digests wait for it)."""

    @property
    def chunk_size(self) -> int: ...

    @property
    def data_size(self) -> int: ...

    @property
    def digests(self) -> Sequence[bytes]: ...


class BlobState:
    def __init__(self, directory: Path, chunk_size: int, data_size: int) -> None:
        self.dir = directory
        self.key = directory.name
        self.chunk_size = chunk_size
        self.data_size = data_size
        self.count = -(-data_size // chunk_size)
        self.present = bytearray(-(-self.count // 8))
        self.trusted = bytearray(self.count)  # checked by this process
        self.table: Table | None = None
        self.data_fd = -1
        self.state_fd = -1
        self.last_read = -2  # last chunk of the previous read (sequential detection)
        self.ahead = 0  # chunks fetched ahead of a sequential read, doubling
        self.prefetched = 0  # with prefetch: chunks before this one were claimed ahead

    @classmethod
    def create(cls, directory: Path, chunk_size: int, data_size: int) -> BlobState:
        directory.mkdir(mode=0o700, exist_ok=True)
        state = cls(directory, chunk_size, data_size)
        header = _HEADER.pack(_MAGIC, _VERSION, chunk_size, data_size, state.count)
        (directory / "present").write_bytes(header + bytes(state.present))
        return state

    @classmethod
    def load(cls, directory: Path) -> BlobState | None:
        """What an earlier run left, or None when it is not a usable entry."""
        try:
            raw = (directory / "present").read_bytes()
            magic, version, chunk_size, data_size, count = _HEADER.unpack_from(raw)
            data_len = (directory / "data").stat().st_size
        except (OSError, struct.error):
            return None
        if magic != _MAGIC or version != _VERSION or chunk_size <= 0 or data_len != data_size:
            return None
        state = cls(directory, chunk_size, data_size)
        if count != state.count or len(raw) != _HEADER.size + len(state.present):
            return None
        state.present[:] = raw[_HEADER.size :]
        return state

    def has(self, index: int) -> bool:
        return bool(self.present[index >> 3] & (1 << (index & 7)))

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.data_size)

    def open(self) -> None:
        if self.data_fd < 0:
            self.data_fd = os.open(self.dir / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.data_fd, self.data_size)
        if self.state_fd < 0:
            self.state_fd = os.open(self.dir / "present", os.O_RDWR | os.O_CLOEXEC)

    def set_bit(self, index: int, value: bool) -> None:
        byte = index >> 3
        if value:
            self.present[byte] |= 1 << (index & 7)
        else:
            self.present[byte] &= ~(1 << (index & 7)) & 0xFF
            self.trusted[index] = 0
        os.pwrite(self.state_fd, bytes([self.present[byte]]), _HEADER.size + byte)

    def close(self) -> None:
        for fd in (self.data_fd, self.state_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.data_fd = self.state_fd = -1


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of a range (the file keeps its size); False if unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return int(libc.fallocate(fd, _FALLOC_PUNCH_HOLE, offset, length)) == 0
