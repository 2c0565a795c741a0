"""Chunk digest tables: sha256 of every fixed-size chunk of a blob, so ranges can be verified.

Binary layout (all integers little-endian), 32-byte header then the digests:

    offset  size  field
    0       8     magic b"APULLCT\\x00"
    8       4     version (1)
    12      4     chunk size in bytes (a power of two, 4096 .. 2**30)
    16      8     data size: bytes covered (the blob's size)
    24      8     chunk count = ceil(data size / chunk size)
    32      32*n  sha256 of each chunk, in order; the last chunk may be short

The same blob and chunk size always give the same bytes. A range can be verified when it
starts on a chunk boundary and ends on one or at the end of the data.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from apull_node.image.format import DEFAULT_CHUNK_SIZE, check_chunk_size

MAGIC = b"APULLCT\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
HEADER_SIZE = _HEADER.size
DIGEST_SIZE = 32
#: Tables are read whole into memory: bound what a reader accepts (~128 TiB at 1 MiB).
MAX_CHUNKS = 1 << 27


class ChunkTableError(ValueError):
    """A chunk table blob is malformed."""


class ChunkVerifyError(ValueError):
    """Data does not match the table (or cannot be checked against it); says which chunk."""


@dataclass(frozen=True)
class ChunkTable:
    chunk_size: int
    data_size: int
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        try:
            check_chunk_size(self.chunk_size)
        except ValueError as exc:
            raise ChunkTableError(str(exc)) from exc
        if self.data_size < 0:
            raise ChunkTableError(f"data size {self.data_size} is negative")
        if len(self.digests) != chunk_count(self.data_size, self.chunk_size):
            raise ChunkTableError(
                f"{len(self.digests)} digests for {self.data_size} bytes in "
                f"{self.chunk_size}-byte chunks"
            )
        if any(len(d) != DIGEST_SIZE for d in self.digests):
            raise ChunkTableError("a digest is not 32 bytes")

    # -- building and (de)serialising -----------------------------------------------------

    @classmethod
    def from_chunks(cls, chunks: Iterable[bytes | memoryview], chunk_size: int) -> ChunkTable:
        """From the data, given as consecutive pieces of exactly chunk_size (last: shorter)."""
        digests: list[bytes] = []
        size = 0
        short = False
        for chunk in chunks:
            if short or len(chunk) > chunk_size or not chunk:
                raise ChunkTableError("pieces must be whole chunks; only the last may be short")
            short = len(chunk) < chunk_size
            digests.append(hashlib.sha256(chunk).digest())
            size += len(chunk)
        return cls(chunk_size, size, tuple(digests))

    @classmethod
    def from_stream(cls, stream: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkTable:
        return cls.from_chunks(_read_chunks(stream, chunk_size), chunk_size)

    @classmethod
    def from_file(cls, path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkTable:
        with open(path, "rb") as stream:
            return cls.from_stream(stream, chunk_size)

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(MAGIC, VERSION, self.chunk_size, self.data_size, len(self.digests))
        return header + b"".join(self.digests)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChunkTable:
        if len(raw) < HEADER_SIZE:
            raise ChunkTableError(f"{len(raw)} bytes: shorter than the header")
        magic, version, chunk_size, data_size, count = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ChunkTableError(f"bad magic {magic!r}")
        if version != VERSION:
            raise ChunkTableError(f"version {version} is not supported (only {VERSION})")
        if count > MAX_CHUNKS:
            raise ChunkTableError(f"{count} chunks: more than {MAX_CHUNKS}")
        if len(raw) != HEADER_SIZE + count * DIGEST_SIZE:
            raise ChunkTableError(f"{len(raw)} bytes: expected {count} digests after the header")
        digests = tuple(
            raw[HEADER_SIZE + i * DIGEST_SIZE : HEADER_SIZE + (i + 1) * DIGEST_SIZE]
            for i in range(count)
        )
        return cls(chunk_size, data_size, digests)

    # -- ranges ---------------------------------------------------------------------------

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """[start, end) of chunk `index`."""
        if not 0 <= index < len(self.digests):
            raise IndexError(f"chunk {index} of {len(self.digests)}")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.data_size)

    def aligned_range(self, offset: int, length: int) -> tuple[int, int]:
        """The smallest verifiable [start, end) covering [offset, offset + length): what to
        fetch for a read the kernel asks for."""
        if offset < 0 or length <= 0 or offset + length > self.data_size:
            raise ChunkVerifyError(
                f"range {offset}+{length} is empty or outside the {self.data_size}-byte blob"
            )
        start = offset - offset % self.chunk_size
        end = -(-(offset + length) // self.chunk_size) * self.chunk_size
        return start, min(end, self.data_size)


def chunk_count(data_size: int, chunk_size: int) -> int:
    return -(-data_size // chunk_size)


def _read_chunks(stream: BinaryIO, chunk_size: int) -> Iterable[bytes]:
    while True:
        chunk = stream.read(chunk_size)
        while chunk and len(chunk) < chunk_size:
            more = stream.read(chunk_size - len(chunk))
            if not more:
                break
            chunk += more
        if not chunk:
            return
        yield chunk


def verify_range(table: ChunkTable, offset: int, data: bytes | memoryview) -> None:
    """Check `data`, read from the blob at `offset`, against the table.

    The range must start on a chunk boundary and end on one or at the end of the blob
    (use `ChunkTable.aligned_range` to widen a request). Raises ChunkVerifyError naming the
    first chunk that does not match, or why the range cannot be checked.
    """
    size = table.chunk_size
    end = offset + len(data)
    if offset < 0 or offset % size:
        raise ChunkVerifyError(f"offset {offset} is not on a {size}-byte chunk boundary")
    if not data:
        raise ChunkVerifyError(f"empty range at offset {offset}")
    if end > table.data_size:
        raise ChunkVerifyError(
            f"range {offset}..{end} goes past the blob's {table.data_size} bytes"
        )
    if end % size and end != table.data_size:
        raise ChunkVerifyError(f"range {offset}..{end} ends inside a chunk")
    view = memoryview(data)
    first = offset // size
    for index in range(first, chunk_count(end, size)):
        start = index * size - offset
        piece = view[start : start + size]
        if hashlib.sha256(piece).digest() != table.digests[index]:
            raise ChunkVerifyError(
                f"chunk {index} (bytes {index * size}..{index * size + len(piece)}) "
                "does not match its digest"
            )
