"""Small blobs fetched whole, their chunk tables computed from them instead of fetched.

A blob of at most `prefetch_layer_max_mb` (base layers: the shell and libc nearly every
container start reads) is fetched in one request, by the warm-up or by its first read,
whichever comes first. Its chunk table is computed from the bytes; when its digest is the
one the blob config names (from the manifest, checked), every chunk is the blob's as surely
as if the table had been fetched: one registry request instead of two. When it is not (a
damaged answer), the table is fetched and the chunk cache fetches the bad chunks again.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from apull_node.daemon.blob_registry import BlobConfig
from apull_node.daemon.blob_source import PendingTable, TableStore
from apull_node.daemon.chunk_cache import BlobSpec, ChunkCache, Source
from apull_node.image.chunks import ChunkTable

log = logging.getLogger("apulld.whole")


def fetch_whole(
    cache: ChunkCache, tables: TableStore, config: BlobConfig, source: Source
) -> int | None:
    """Fetch the blob whole into the cache when its chunk table is neither here nor on its
    way (TableStore.expect); bytes fetched (0: readers had claimed every chunk). None when
    the table is known: then the caller goes the usual way (no table fetched twice)."""
    expected = tables.expect(config)
    if expected is None:
        return None
    spec = BlobSpec(config.digest, config.size, PendingTable(config, expected))
    try:
        return cache.warm(spec, _Whole(source, config, tables, expected), 0, config.size)
    finally:  # nothing fetched whole (readers came first, or it failed): fetch the table
        tables.settle(config, expected, None)


class _Whole:
    """The chunk cache's `Source` for a layer warmed whole: the whole blob in one request,
    its chunk table computed from it (TableStore.settle) before the cache checks the chunks
    against it; when it does not match, the table is fetched and the cache fetches the bad
    chunks again. Any other range (readers claimed some chunks first, or a bad chunk fetched
    again) comes straight from the registry and, the first time, sends for the table."""

    def __init__(
        self, source: Source, config: BlobConfig, tables: TableStore, table: Future[ChunkTable]
    ) -> None:
        self.source = source
        self.config = config
        self.tables = tables
        self.table = table

    def fetch(self, start: int, end: int, avoid: str = "") -> tuple[bytes | bytearray, str]:
        data, endpoint = self.source.fetch(start, end, avoid)
        # Settled before the cache checks anything against the table, whatever the range: a
        # reader may have claimed some chunks first (then this is not the whole blob, and
        # the table is fetched), and the check waits for the table.
        whole = (start, end) == (0, self.config.size)
        if not self.tables.settle(self.config, self.table, data if whole else None) and whole:
            log.warning(
                "blob %s fetched whole from %s does not match its chunk table %s: "
                "fetching the table", self.config.blob_id, endpoint, self.config.chunk_table,
            )  # fmt: skip
        return data, endpoint

    def mark_bad(self, endpoint: str) -> None:
        self.source.mark_bad(endpoint)
