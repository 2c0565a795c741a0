"""A configured blob's way to its bytes: the registry location and its verified chunk table.

Chunk tables are small and content-addressed: each is fetched once from the blob's
repository, checked against the digest the blob config names, and kept under
``<cache_dir>/tables/`` (checked again when read back).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from pathlib import Path

from apull.daemon.blob_registry import BlobConfig
from apull.daemon.registry_fetch import BlobLocation, FetchError, RangeFetcher
from apull.image.chunks import ChunkTable, ChunkTableError

MAX_TABLE_SIZE = 64 << 20


class TableError(Exception):
    """A blob's chunk table cannot be had or does not fit the blob; the message says why."""


class RegistrySource:
    """The chunk cache's `Source` for one blob."""

    def __init__(self, fetcher: RangeFetcher, location: BlobLocation) -> None:
        self.fetcher = fetcher
        self.location = location

    def fetch(self, start: int, end: int, avoid: str = "") -> tuple[bytes | bytearray, str]:
        return self.fetcher.fetch(self.location, start, end, avoid)

    def mark_bad(self, endpoint: str) -> None:
        self.fetcher.mark_bad(endpoint)


def location_of(config: BlobConfig) -> BlobLocation:
    return BlobLocation(config.registry, config.repo, config.digest)


def digest_of(data: bytes, algorithm: str) -> str:
    """`<algorithm>:<hex>` of the bytes (sha256 or sha512)."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


class TableStore:
    def __init__(self, root: Path, fetcher: RangeFetcher) -> None:
        self.root = root
        self.fetcher = fetcher
        self._tables: dict[str, ChunkTable] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def get(self, config: BlobConfig) -> ChunkTable:
        digest = config.chunk_table
        if not digest:
            raise TableError(f"blob {config.blob_id} has no chunk_table")
        with self._lock:
            table = self._tables.get(digest)
            lock = self._locks.setdefault(digest, threading.Lock())
        if table is None:
            with lock:  # one fetch per table, however many readers want it
                with self._lock:
                    table = self._tables.get(digest)
                if table is None:
                    table = self._load(config)
                    with self._lock:
                        self._tables[digest] = table
        _check_fits(config, table)
        return table

    def _load(self, config: BlobConfig) -> ChunkTable:
        digest = config.chunk_table
        algorithm, _, hexdigest = digest.partition(":")
        path = self.root / f"{algorithm}-{hexdigest}"
        raw = b""
        with contextlib.suppress(OSError):
            raw = path.read_bytes()
        if not raw or digest_of(raw, algorithm) != digest:
            table_blob = BlobLocation(config.registry, config.repo, digest)
            try:
                raw = self.fetcher.fetch_whole(table_blob, MAX_TABLE_SIZE)
            except FetchError as err:
                raise TableError(f"chunk table of blob {config.blob_id}: {err}") from err
            got = digest_of(raw, algorithm)
            if got != digest:
                raise TableError(
                    f"chunk table {table_blob}: got {len(raw)} bytes with digest {got}"
                )
            self._save(path, raw)
        try:
            return ChunkTable.from_bytes(raw)
        except ChunkTableError as err:
            raise TableError(f"chunk table {digest} of blob {config.blob_id}: {err}") from err

    def _save(self, path: Path, raw: bytes) -> None:
        fd, temp = tempfile.mkstemp(prefix=".table-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(raw)
            os.replace(temp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _check_fits(config: BlobConfig, table: ChunkTable) -> None:
    if table.data_size != config.size:
        raise TableError(
            f"chunk table {config.chunk_table} covers {table.data_size} bytes; "
            f"blob {config.blob_id} has {config.size}"
        )
    if config.chunk_size and table.chunk_size != config.chunk_size:
        raise TableError(
            f"chunk table {config.chunk_table} has {table.chunk_size}-byte chunks; "
            f"blob {config.blob_id} says {config.chunk_size}"
        )
