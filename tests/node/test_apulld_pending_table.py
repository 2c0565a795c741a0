"""A first read fetches its chunks while the blob's chunk table is still being fetched
(TableStore.soon): one registry round trip instead of two in a row, and still nothing is
handed out before the table has checked it."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import pytest

from apull_node.daemon.blob_registry import BlobConfig
from apull_node.daemon.blob_source import PendingTable, TableError, TableStore
from apull_node.daemon.chunk_cache import BlobSpec, ChunkCache
from apull_node.daemon.counters import Counters
from apull_node.daemon.registry_fetch import BlobLocation, FetchError
from apull_node.daemon.whole_blob import _Whole
from apull_node.image.chunks import ChunkTable

CHUNK = 4096
DATA = random.Random(7).randbytes(6 * CHUNK + 100)
TABLE = ChunkTable.from_chunks([DATA[i : i + CHUNK] for i in range(0, len(DATA), CHUNK)], CHUNK)
RAW_TABLE = TABLE.to_bytes()
CONFIG = BlobConfig(
    blob_id="sha256-" + "cd" * 32,
    registry="registry.example",
    repo="lab/app",
    digest="sha256:" + "cd" * 32,
    size=len(DATA),
    chunk_table="sha256:" + hashlib.sha256(RAW_TABLE).hexdigest(),
    chunk_table_size=len(RAW_TABLE),
    chunk_size=CHUNK,
)


class GatedTables:
    """A RangeFetcher stand-in whose chunk-table fetch waits until a chunk was asked for."""

    def __init__(self, table: bytes = RAW_TABLE) -> None:
        self.table = table
        self.chunk_asked = threading.Event()
        self.table_fetches = 0

    def fetch_whole(self, blob: BlobLocation, limit: int) -> bytes:
        self.table_fetches += 1
        if not self.chunk_asked.wait(5):
            raise FetchError("the chunk was never asked for while the table was on its way")
        return self.table


class Source:
    def __init__(self, tables: GatedTables, data: bytes = DATA) -> None:
        self.tables = tables
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def fetch(self, start: int, end: int, avoid: str = "") -> tuple[bytes, str]:
        self.calls.append((start, end))
        self.tables.chunk_asked.set()
        return self.data[start:end], "origin"

    def mark_bad(self, endpoint: str) -> None:
        pass


def test_a_first_read_fetches_its_chunk_while_the_table_is_fetched(tmp_path: Path) -> None:
    fetcher = GatedTables()
    tables = TableStore(tmp_path / "tables", fetcher)  # type: ignore[arg-type]
    cache = ChunkCache(tmp_path / "chunks", 1 << 30, Counters())
    source = Source(fetcher)
    try:
        table = tables.soon(CONFIG)
        assert isinstance(table, PendingTable)
        got = cache.read(BlobSpec(CONFIG.digest, CONFIG.size, table), source, 100, 5000)
        assert bytes(got) == DATA[100:5100]
        assert source.calls == [(0, 2 * CHUNK)]
        # Fetched once; afterwards the table is simply there.
        assert fetcher.table_fetches == 1
        assert tables.soon(CONFIG) == TABLE
    finally:
        tables.close()
        cache.close()


def test_chunks_fetched_before_their_table_are_still_checked(tmp_path: Path) -> None:
    fetcher = GatedTables()
    tables = TableStore(tmp_path / "tables", fetcher)  # type: ignore[arg-type]
    cache = ChunkCache(tmp_path / "chunks", 1 << 30, Counters())
    wrong = bytearray(DATA)
    wrong[10] ^= 1
    source = Source(fetcher, bytes(wrong))
    try:
        spec = BlobSpec(CONFIG.digest, CONFIG.size, tables.soon(CONFIG))
        with pytest.raises(Exception, match="did not match its digest"):
            cache.read(spec, source, 0, 100)
    finally:
        tables.close()
        cache.close()


def test_a_table_that_cannot_be_had_fails_the_read(tmp_path: Path) -> None:
    fetcher = GatedTables(table=RAW_TABLE[:-1] + bytes([RAW_TABLE[-1] ^ 1]))
    tables = TableStore(tmp_path / "tables", fetcher)  # type: ignore[arg-type]
    cache = ChunkCache(tmp_path / "chunks", 1 << 30, Counters())
    try:
        spec = BlobSpec(CONFIG.digest, CONFIG.size, tables.soon(CONFIG))
        with pytest.raises(TableError, match="digest"):
            cache.read(spec, Source(fetcher), 0, 100)
        assert not cache.used  # nothing unchecked was kept
    finally:
        tables.close()
        cache.close()


def test_a_reader_first_does_not_stall_a_layer_warmed_whole(tmp_path: Path) -> None:
    """The warm-up announced it computes the table from the whole layer (TableStore.expect),
    but a reader claimed the first chunk before it: the warm-up fetches the rest, so it has
    no whole blob to compute the table from, and sends for it (else both would wait for a
    table nobody fetches)."""
    fetcher = GatedTables()
    tables = TableStore(tmp_path / "tables", fetcher)  # type: ignore[arg-type]
    cache = ChunkCache(tmp_path / "chunks", 1 << 30, Counters())
    reader_source, warm_source = Source(fetcher), Source(fetcher)
    expected = tables.expect(CONFIG)
    assert expected is not None
    pending = tables.soon(CONFIG)
    assert isinstance(pending, PendingTable)
    spec = BlobSpec(CONFIG.digest, CONFIG.size, pending)
    got: list[bytes] = []
    warmed: list[int] = []
    reader = threading.Thread(
        target=lambda: got.append(bytes(cache.read(spec, reader_source, 0, 100))), daemon=True
    )
    whole = _Whole(warm_source, CONFIG, tables, expected)
    warmer = threading.Thread(
        target=lambda: warmed.append(cache.warm(spec, whole, 0, CONFIG.size)), daemon=True
    )
    try:
        reader.start()
        assert fetcher.chunk_asked.wait(5)  # the reader has claimed and fetched chunk 0
        warmer.start()
        reader.join(5)
        warmer.join(5)
        assert got == [DATA[:100]]
        assert warmed == [len(DATA) - CHUNK]
        assert warm_source.calls == [(CHUNK, len(DATA))]
        assert fetcher.table_fetches == 1
    finally:
        tables.settle(CONFIG, expected, None)  # the old code left it pending
        cache.close()
        tables.close()
