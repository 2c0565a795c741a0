"""A configured blob's way to its bytes: the registry location and its verified chunk table.

Chunk tables are small and content-addressed: each is fetched once from the blob's
repository, checked against the digest the blob config names, and kept under
``<cache_dir>/tables/`` (checked again when read back).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

from apull_node.daemon.blob_registry import BlobConfig
from apull_node.daemon.registry_fetch import BlobLocation, FetchError, RangeFetcher
from apull_node.image.chunks import ChunkTable, ChunkTableError
from apull_node.service.files import replace_file

MAX_TABLE_SIZE = 64 << 20
#: Chunk tables fetched at once in the background (see TableStore.soon).
TABLE_WORKERS = 4


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


class PendingTable:
    """A chunk table being fetched. Its chunk size and data size come from the blob config,
    so the chunk cache can fetch chunks meanwhile; `digests` waits for the table (and raises
    TableError when it cannot be had): nothing is verified, let alone served, before."""

    def __init__(self, config: BlobConfig, table: Future[ChunkTable]) -> None:
        self.config = config
        self.chunk_size = config.chunk_size
        self.data_size = config.size
        self._table = table

    def ready(self) -> ChunkTable:
        """The table, once here, checked to fit this blob config; TableError if not."""
        try:
            table = self._table.result()
        except CancelledError as err:
            raise TableError("apulld is stopping: the chunk table was not fetched") from err
        _check_fits(self.config, table)
        return table

    @property
    def digests(self) -> Sequence[bytes]:
        return self.ready().digests


class TableStore:
    def __init__(self, root: Path, fetcher: RangeFetcher) -> None:
        self.root = root
        self.fetcher = fetcher
        self._tables: dict[str, ChunkTable] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._fetching: dict[str, Future[ChunkTable]] = {}
        self._expected: set[Future[ChunkTable]] = set()  # expect()ed, not settled yet
        self._fetcher = ThreadPoolExecutor(TABLE_WORKERS, thread_name_prefix="table")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def soon(self, config: BlobConfig) -> ChunkTable | PendingTable:
        """The table if it is here; else, when the config names the chunk size, one being
        fetched in the background (a first read fetches its chunks and the table at once:
        one registry round trip instead of two in a row); else `get`. A reader of a
        PendingTable calls its `ready()` before it answers: the config must fit its table
        even when every chunk the read wanted was cached already (checked when another
        reader of the same blob fetched it)."""
        digest = config.chunk_table
        future: Future[ChunkTable] | None = None
        started = False
        with self._lock:
            table = self._tables.get(digest)
            if table is None and config.chunk_size and digest:
                future = self._fetching.get(digest)
                if future is None:
                    future = self._fetcher.submit(self.get, config)
                    self._fetching[digest] = future
                    started = True
        if future is not None:
            if started:  # outside the lock: a future already done calls back at once
                future.add_done_callback(lambda _: self._fetched(digest))
            return PendingTable(config, future)
        if table is not None:
            _check_fits(config, table)
            return table
        return self.get(config)

    def _fetched(self, digest: str) -> None:
        with self._lock:
            self._fetching.pop(digest, None)

    def close(self) -> None:
        self._fetcher.shutdown(wait=False, cancel_futures=True)

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

    def expect(self, config: BlobConfig) -> Future[ChunkTable] | None:
        """Announce that the caller fetches the blob whole and computes its chunk table from
        it (`settle`): until then readers get the table pending (`soon`), as if it were being
        fetched, and fetch no table of their own. None when the table is here, on its way,
        or on disk (then nothing is to be computed)."""
        digest = config.chunk_table
        if not digest or not config.chunk_size or self._known(digest):
            return None
        if self._path(digest).exists():
            return None
        with self._lock:
            if digest in self._tables or digest in self._fetching:
                return None
            future: Future[ChunkTable] = Future()
            self._fetching[digest] = future
            self._expected.add(future)
        future.add_done_callback(lambda _: self._fetched(digest))
        return future

    def _known(self, digest: str) -> bool:
        with self._lock:
            return digest in self._tables or digest in self._fetching

    def settle(
        self, config: BlobConfig, future: Future[ChunkTable], blob: bytes | bytearray | None
    ) -> bool:
        """Complete an expected table: computed from `blob` (the whole blob) when its digest
        is the one the blob config names (then every chunk of `blob` is the blob's, as if
        checked against the fetched table); else fetched from the registry in the
        background. Whether `blob` matched; a table settled already is left alone."""
        with self._lock:
            if future not in self._expected:
                return False
            self._expected.discard(future)
        table = self._derive(config, blob) if blob is not None else None
        if table is not None:
            future.set_result(table)
            return True

        stopping = TableError("apulld is stopping: the chunk table was not fetched")
        try:
            fetching = self._fetcher.submit(self.get, config)
        except RuntimeError:  # shut down
            future.set_exception(stopping)
            return False
        fetching.add_done_callback(lambda done: _pass_on(done, future, stopping))
        return False

    def _derive(self, config: BlobConfig, blob: bytes | bytearray) -> ChunkTable | None:
        digest, chunk = config.chunk_table, config.chunk_size
        if not blob or len(blob) != config.size:
            return None
        view = memoryview(blob)
        try:
            table = ChunkTable.from_chunks(
                (view[at : at + chunk] for at in range(0, len(view), chunk)), chunk
            )
        except ChunkTableError:
            return None
        raw = table.to_bytes()
        if digest_of(raw, digest.partition(":")[0]) != digest:
            return None
        with self._lock:
            table = self._tables.setdefault(digest, table)
        self._save(self._path(digest), raw)
        return table

    def _load(self, config: BlobConfig) -> ChunkTable:
        digest = config.chunk_table
        algorithm = digest.partition(":")[0]
        path = self._path(digest)
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

    def _path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.root / f"{algorithm}-{hexdigest}"

    def _save(self, path: Path, raw: bytes) -> None:
        with contextlib.suppress(OSError):  # kept in memory anyway; fetched again next time
            replace_file(path, raw)


def _pass_on(done: Future[ChunkTable], to: Future[ChunkTable], cancelled: TableError) -> None:
    """Complete `to` as `done` ended (its table or its error; `cancelled` if it never ran)."""
    if done.cancelled():
        to.set_exception(cancelled)
    elif (error := done.exception()) is not None:
        to.set_exception(error)
    else:
        to.set_result(done.result())


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
