"""apulld's local chunk cache: every byte it hands out was checked against the chunk table.

Layout under ``<cache_dir>/chunks/``, one directory per blob and chunk size
(``sha256-<hex>-c<chunk size>``):

- ``data``: a sparse file of the blob's size; a chunk, once verified, is written at its
  offset.
- ``present``: a header and a bitmap of the chunks in ``data`` (chunk_state.py), updated
  one byte at a time as chunks arrive or leave.

Rules:

- A fetched chunk is checked (sha256 against the table) before it is written or returned.
  A bad one is fetched again (from another endpoint if there is one) a few times, then the
  read fails; wrong bytes are never returned.
- Chunks found on disk from an earlier run are checked again the first time this process
  reads each of them (so a torn write or a crash between data and bitmap cannot leak bad
  bytes); from then on they are trusted.
- Readers wanting the same missing chunk share one fetch; missing neighbours are fetched
  with one range request; sequential readers fetch ahead (a doubling window), with
  ``prefetch=True`` in background threads, several windows deep, while they are served.
- The sum of cached chunk sizes stays under the limit: least recently used chunks, of any
  blob, are punched out of their data files. Order after a restart: blobs whose bitmap
  changed least recently go first.
- With ``keep=False`` nothing is written to disk: chunks are verified and handed out only
  (the fscache backend, whose kernel cache files keep what it writes into them). Then a
  sequential reader's read-ahead counts as read, since the caller stores it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Union

from apull_node.daemon import apulld_metrics as metrics
from apull_node.daemon.chunk_state import BlobState, Table, punch_hole
from apull_node.daemon.counters import Counters

log = logging.getLogger("apulld.cache")
FETCH_TRIES = 3
#: Sequential reads fetch ahead: the window doubles with each sequential fetch up to this
#: many bytes, so a streaming reader makes few large range requests, not one per chunk.
READ_AHEAD_BYTES = 4 << 20
#: With ChunkCache(prefetch=True), a sequential reader's next windows (each up to
#: PREFETCH_WINDOW_BYTES, growing as above) are fetched by background threads, this many
#: windows ahead of it, while it is served: fetching, checking and storing overlap with the
#: reads. Larger than READ_AHEAD_BYTES (nobody waits for a whole window): each request costs
#: the registry too (make bench: 16 MiB windows halved its CPU for a 256 MiB file).
PREFETCH_WINDOWS = 3
PREFETCH_WINDOW_BYTES = 16 << 20
#: A chunk that could not be had fails again at once for this many seconds (the kernel
#: retries a failed read-ahead page by page; each would pay for the same fetches).
FAILURE_MEMORY_SECONDS = 2.0


class ChunkUnavailableError(Exception):
    """The range cannot be served with verified bytes; the message says which and why."""


class Source(Protocol):
    """Where missing chunks come from (the registry, through mirrors)."""

    def fetch(self, start: int, end: int, avoid: str = "") -> tuple[bytes | bytearray, str]:
        """Bytes [start, end) and the name of the endpoint that sent them."""

    def mark_bad(self, endpoint: str) -> None: ...


@dataclass(frozen=True)
class BlobSpec:
    digest: str
    size: int
    table: Table

    @property
    def key(self) -> str:
        algorithm, _, hexdigest = self.digest.partition(":")
        return f"{algorithm}-{hexdigest}-c{self.table.chunk_size}"


#: Chunk bytes: a fetched response is cut into chunks without copying.
Buffer = Union[bytes, bytearray, memoryview]
#: Read results per chunk index: (blob offset of the data, the data).
Pieces = dict[int, tuple[int, Buffer]]


@dataclass(frozen=True)
class _Sizes:
    """A table's sizes alone (for the key of a blob and chunk size)."""

    chunk_size: int
    data_size: int
    digests: tuple[bytes, ...] = ()


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    data: Buffer = b""
    error: str = ""


class ChunkCache:
    def __init__(
        self, root: Path, limit_bytes: int, counters: Counters, keep: bool = True,
        prefetch: bool = False, caller_stores: bool = False,
    ) -> None:  # fmt: skip
        """`caller_stores`: the caller stores what a read returns, the chunks fetched ahead
        included (the fscache backend writes them into the kernel's cache file), so the
        chunks fetched ahead count as read (with keep=False they always do)."""
        self.root = root
        self.limit = limit_bytes
        self.counters = counters
        self.keep = keep
        self.caller_stores = caller_stores or not keep
        self.used = 0
        self._lock = threading.Lock()
        self._states: dict[str, BlobState] = {}
        self._lru: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._pins: Counter[tuple[str, int]] = Counter()
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._failed: dict[tuple[str, int], tuple[float, str]] = {}
        self._punch_warned = False
        # Background fetches ahead need keep=True: what they fetch must be stored for the
        # reads that come for it.
        self._prefetcher = (
            ThreadPoolExecutor(PREFETCH_WINDOWS, thread_name_prefix="prefetch")
            if prefetch and keep
            else None
        )
        if keep:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._scan()

    # -- startup --------------------------------------------------------------------------

    def _scan(self) -> None:
        """Account for what earlier runs left, oldest bitmaps first in the LRU order."""
        found: list[tuple[float, BlobState]] = []
        for directory in self.root.iterdir():
            state = BlobState.load(directory)
            if state is None:
                log.warning("removing unusable cache entry %s", directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            found.append(((directory / "present").stat().st_mtime, state))
        for _, state in sorted(found, key=lambda item: item[0]):
            self._states[state.key] = state
            for index in range(state.count):
                if state.has(index):
                    start, end = state.bounds(index)
                    self._lru[(state.key, index)] = end - start
                    self.used += end - start
        if found:
            log.info(
                "chunk cache %s: %d blobs, %d chunks, %d bytes (limit %d)",
                self.root, len(found), len(self._lru), self.used, self.limit,
            )  # fmt: skip
        self._evict()

    def _state(self, spec: BlobSpec) -> BlobState:
        """The blob's state (created on first use); called with the lock held."""
        state = self._states.get(spec.key)
        if state is not None and state.data_size != spec.size:
            self._drop(state)
            state = None
        if state is None:
            directory, chunk = self.root / spec.key, spec.table.chunk_size
            if self.keep:
                state = BlobState.create(directory, chunk, spec.size)
            else:
                state = BlobState(directory, chunk, spec.size)  # in memory only
            self._states[spec.key] = state
        state.table = spec.table
        if self.keep:
            state.open()
        return state

    def _drop(self, state: BlobState) -> None:
        for index in range(state.count):
            length = self._lru.pop((state.key, index), None)
            if length is not None:
                self.used -= length
        state.close()
        shutil.rmtree(state.dir, ignore_errors=True)
        self._states.pop(state.key, None)

    # -- reading --------------------------------------------------------------------------

    def read(self, spec: BlobSpec, source: Source, offset: int, size: int) -> Buffer:
        """Verified bytes [offset, offset + size) of the blob (short at its end)."""
        end = min(offset + size, spec.size)
        if offset >= end:
            return b""
        whole = self._read_trusted(spec, source, offset, end)
        if whole is not None:
            return whole
        pieces = self._gather(spec, source, offset, end, whole=False)
        chunk = spec.table.chunk_size
        parts = []
        for index in range(offset // chunk, (end - 1) // chunk + 1):
            at, data = pieces[index]
            low, high = max(offset, index * chunk), min(end, (index + 1) * chunk)
            parts.append(memoryview(data)[low - at : high - at])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_trusted(self, spec: BlobSpec, source: Source, offset: int, end: int) -> bytes | None:
        """[offset, end) with one pread (no copy per chunk, no join) when every chunk of it
        is cached and was checked by this process; else None (the general path)."""
        if not self.keep:
            return None
        chunk = spec.table.chunk_size
        first, last = offset // chunk, (end - 1) // chunk
        with self._lock:
            state = self._state(spec)
            self._recent_failure(state.key, first, last)
            indexes = range(first, last + 1)
            if not all(state.has(i) and state.trusted[i] for i in indexes):
                return None
            for index in indexes:
                key = (state.key, index)
                self._pins[key] += 1
                self._lru.move_to_end(key)
            ahead = self._advance(state, first, last)
        self._start_prefetch(state, spec, source, ahead)
        data = self._pread_pinned(state, indexes, offset, end)
        if data is None:
            return None
        metrics.CACHE_HITS.inc(len(indexes))
        self.counters.add("chunks_from_cache", len(indexes))
        self.counters.add("bytes_from_cache", len(data))
        return data

    def held_range(self, digest: str, offset: int, end: int) -> bytes | None:
        """Bytes [offset, end) of the blob for a peer: only when every chunk of it is cached
        and was checked by this process (else None: the peer asks elsewhere); no fetch, no
        read-ahead, not a read of ours."""
        if not self.keep or offset < 0 or end <= offset:
            return None
        prefix = digest.replace(":", "-", 1) + "-c"
        with self._lock:
            states = [st for key, st in self._states.items() if key.startswith(prefix)]
            for state in states:
                first, last = offset // state.chunk_size, (end - 1) // state.chunk_size
                if end > state.data_size or state.data_fd < 0:
                    continue
                indexes = range(first, last + 1)
                if all(state.has(i) and state.trusted[i] for i in indexes):
                    for index in indexes:
                        self._pins[(state.key, index)] += 1
                    break
            else:
                return None
        return self._pread_pinned(state, indexes, offset, end)

    def _pread_pinned(
        self, state: BlobState, indexes: range, offset: int, end: int
    ) -> bytes | None:
        """[offset, end) of the blob's data file, its chunks pinned by the caller (unpinned
        here); None when the file is short."""
        try:
            data = os.pread(state.data_fd, end - offset, offset)
        finally:
            with self._lock:
                for index in indexes:
                    self._unpin((state.key, index))
        return data if len(data) == end - offset else None

    def read_span(
        self, spec: BlobSpec, source: Source, offset: int, size: int
    ) -> tuple[int, bytes]:
        """Verified whole chunks covering [offset, offset + size), followed by the chunks
        fetched ahead with them: (blob offset of the first chunk, their bytes)."""
        end = min(offset + size, spec.size)
        if offset >= end:
            return offset, b""
        pieces = self._gather(spec, source, offset, end, whole=True)
        chunk = spec.table.chunk_size
        first = index = offset // chunk
        parts = []
        while index in pieces:
            parts.append(pieces[index][1])
            index += 1
        return first * chunk, b"".join(parts)

    def present(self, digest: str, chunk_size: int, size: int) -> list[bool]:
        """Which chunks of the blob are cached (all False with keep=False), read without
        taking the blob on: a blob this process has not used is read from its bitmap."""
        count = -(-size // chunk_size)
        key = BlobSpec(digest, size, _Sizes(chunk_size, size)).key
        with self._lock:
            state = self._states.get(key)
            if state is not None and state.data_size == size:
                return [state.has(index) for index in range(state.count)]
        if not self.keep:
            return [False] * count
        found = BlobState.load(self.root / key)
        if found is None or found.data_size != size or found.count != count:
            return [False] * count
        try:
            return [found.has(index) for index in range(count)]
        finally:
            found.close()

    def fill(self, spec: BlobSpec, source: Source, offset: int, size: int) -> Pieces:
        """Fetch and verify exactly the missing chunks of [offset, offset + size), for a
        prewarm: no read-ahead, not counted as a read; chunks in flight are waited for, cached
        ones left alone (with keep, what is fetched is stored). The pieces fetched or waited
        for; ChunkUnavailableError when one cannot be had."""
        end = min(offset + size, spec.size)
        if offset >= end:
            return {}
        chunk = spec.table.chunk_size
        mine: list[int] = []
        waits: dict[int, _Flight] = {}
        with self._lock:
            state = self._state(spec)
            for index in range(offset // chunk, (end - 1) // chunk + 1):
                key = (state.key, index)
                if self.keep and state.has(index):
                    continue
                if key in self._flights:
                    waits[index] = self._flights[key]
                else:
                    self._flights[key] = _Flight()
                    mine.append(index)
        pieces: Pieces = {}
        errors = self._fetch_runs(state, spec, source, mine, pieces)
        for index, flight in waits.items():
            flight.done.wait()
            if flight.error:
                errors.append(flight.error)
            else:
                pieces[index] = (index * chunk, flight.data)
        if any(index not in pieces for index in [*mine, *waits]):
            raise ChunkUnavailableError(errors[0] if errors else "chunks missing")
        return pieces

    def warm(self, spec: BlobSpec, source: Source, offset: int, size: int) -> int:
        """Fetch and store the missing chunks of [offset, offset + size) before anyone reads
        them (not a read: no read-ahead follows). Chunks cached, in flight or failed moments
        ago are left alone; a failure is only logged (a read fetches again). Returns the
        bytes fetched; 0 with keep=False (nothing would keep them)."""
        end = min(offset + size, spec.size)
        if not self.keep or offset >= end:
            return 0
        chunk = spec.table.chunk_size
        mine: list[int] = []
        with self._lock:
            state = self._state(spec)
            for index in range(offset // chunk, (end - 1) // chunk + 1):
                key = (state.key, index)
                if state.has(index) or key in self._flights or key in self._failed:
                    continue
                self._flights[key] = _Flight()
                mine.append(index)
        pieces: Pieces = {}
        errors = self._fetch_runs(state, spec, source, mine, pieces)
        if errors:
            log.warning("warming %s: %s", state.key, errors[0])
        return sum(len(data) for _, data in pieces.values())

    def _gather(self, spec: BlobSpec, source: Source, offset: int, end: int, whole: bool) -> Pieces:
        """Verified pieces of every chunk of [offset, end) and of the chunks fetched ahead;
        with `whole`, cached chunks are read whole too, else only their part in the range."""
        chunk = spec.table.chunk_size
        first, last = offset // chunk, (end - 1) // chunk
        cached, waits, mine = [], {}, []
        ahead: list[list[int]] = []
        with self._lock:
            state = self._state(spec)
            self._recent_failure(state.key, first, last)
            for index in range(first, last + 1):
                key = (state.key, index)
                if state.has(index):
                    self._pins[key] += 1
                    self._lru.move_to_end(key)
                    cached.append(index)
                elif key in self._flights:
                    waits[index] = self._flights[key]
                else:
                    self._flights[key] = _Flight()
                    mine.append(index)
            missed = len(waits) + len(mine)  # before the chunks claimed ahead of the read
            if self._prefetcher is not None:
                ahead = self._advance(state, first, last)
            else:
                mine += self._read_ahead(state, first, last, mine)
            if self.caller_stores and mine:
                state.last_read = max(state.last_read, mine[-1])
        self._start_prefetch(state, spec, source, ahead)
        if missed:
            metrics.CACHE_MISSES.inc(missed)
        pieces: Pieces = {}
        try:
            for index in cached:
                low, high = (0, spec.size) if whole else (offset, end)
                got = self._read_cached(state, index, low, high)
                if got is None:
                    mine.append(index)  # claimed by _read_cached when it dropped the chunk
                else:
                    pieces[index] = got
        finally:
            with self._lock:
                for index in cached:
                    self._unpin((state.key, index))
        errors = self._fetch_runs(state, spec, source, sorted(mine), pieces)
        for index, flight in waits.items():
            flight.done.wait()
            if flight.error:
                errors.append(flight.error)
            else:
                pieces[index] = (index * chunk, flight.data)
        if any(index not in pieces for index in range(first, last + 1)):
            raise ChunkUnavailableError(errors[0] if errors else "chunks missing")
        return pieces  # a chunk fetched ahead that failed is only left out

    def _read_ahead(self, state: BlobState, first: int, last: int, mine: list[int]) -> list[int]:
        """Claim missing chunks after a sequential read's own (lock held)."""
        if not self._sequential(state, first, last):
            return []
        if not mine or mine[-1] != last:
            return []
        limit = max(1, READ_AHEAD_BYTES // state.chunk_size)
        state.ahead = min(limit, max(1, state.ahead * 2))
        extra = []
        for index in range(last + 1, min(state.count, last + 1 + state.ahead)):
            key = (state.key, index)
            if state.has(index) or key in self._flights:
                break
            self._flights[key] = _Flight()
            extra.append(index)
        return extra

    def _advance(self, state: BlobState, first: int, last: int) -> list[list[int]]:
        """With prefetch: note the read; for a sequential one claim the missing chunks of
        the next windows, up to PREFETCH_WINDOWS windows ahead of it (lock held). Returns
        the runs to fetch in the background, one request each."""
        if self._prefetcher is None:
            self._sequential(state, first, last)
            return []
        if not self._sequential(state, first, last):
            state.prefetched = last + 1
            return []
        limit = max(1, PREFETCH_WINDOW_BYTES // state.chunk_size)
        state.ahead = min(limit, max(1, state.ahead * 2))
        start = max(state.prefetched, last + 1)
        depth = PREFETCH_WINDOWS if state.ahead == limit else 1  # deep once it streams
        target = last + 1 + depth * state.ahead
        runs: list[list[int]] = []
        while start < state.count and start + state.ahead <= target:  # whole windows
            stop = min(state.count, start + state.ahead)
            run: list[int] = []
            for index in range(start, stop):
                key = (state.key, index)
                if state.has(index) or key in self._flights:
                    if run:
                        runs.append(run)
                        run = []
                    continue
                self._flights[key] = _Flight()
                run.append(index)
            if run:
                runs.append(run)
            start = stop
        state.prefetched = max(state.prefetched, start)
        return runs

    def _start_prefetch(
        self, state: BlobState, spec: BlobSpec, source: Source, runs: list[list[int]]
    ) -> None:
        for run in runs:
            assert self._prefetcher is not None
            try:
                self._prefetcher.submit(self._prefetch, state, spec, source, run)
            except RuntimeError:  # shut down: nobody may wait for ever on what was claimed
                for index in run:
                    self._finish(state, index, b"", "apulld is stopping")

    def _prefetch(self, state: BlobState, spec: BlobSpec, source: Source, run: list[int]) -> None:
        try:
            self._fetch_runs(state, spec, source, run, {})  # errors: finished with them
        except Exception:
            log.exception("fetching chunks %d-%d of %s ahead failed", run[0], run[-1], state.key)
            for index in run:
                self._finish(state, index, b"", "fetching ahead failed")

    @staticmethod
    def _sequential(state: BlobState, first: int, last: int) -> bool:
        """Whether this read continues the previous one; remembers it (lock held)."""
        sequential = state.last_read <= first <= state.last_read + 1
        state.last_read = last
        if not sequential:
            state.ahead = 0
        return sequential

    def _recent_failure(self, key: str, first: int, last: int) -> None:
        """Fail at once if one of the chunks failed moments ago (lock held)."""
        if not self._failed:
            return
        now = time.monotonic()
        for chunk in [k for k, (until, _) in self._failed.items() if until <= now]:
            del self._failed[chunk]
        for index in range(first, last + 1):
            failed = self._failed.get((key, index))
            if failed is not None:
                raise ChunkUnavailableError(failed[1])

    def _unpin(self, key: tuple[str, int]) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def _read_cached(
        self, state: BlobState, index: int, offset: int, end: int
    ) -> tuple[int, Buffer] | None:
        """The wanted part of a cached chunk (all of it when it must be checked first)."""
        start, stop = state.bounds(index)
        if state.trusted[index]:
            low, high = max(offset, start), min(end, stop)
            data = os.pread(state.data_fd, high - low, low)
            metrics.CACHE_HITS.inc()
            self.counters.add("chunks_from_cache")
            self.counters.add("bytes_from_cache", len(data))
            return low, data
        data = os.pread(state.data_fd, stop - start, start)
        assert state.table is not None
        if len(data) == stop - start and _digest(data) == state.table.digests[index]:
            state.trusted[index] = 1
            metrics.CACHE_HITS.inc()
            self.counters.add("chunks_from_cache")
            self.counters.add("bytes_from_cache", len(data))
            return start, data
        log.warning("cached chunk %d of %s is damaged; fetching it again", index, state.key)
        metrics.VERIFY_FAILURES_CACHE.inc()
        metrics.CACHE_MISSES.inc()  # fetched again by the read
        self.counters.add("cache_damaged_chunks")
        with self._lock:
            self._remove(state, index)
            self._flights.setdefault((state.key, index), _Flight())
        return None

    def _fetch_runs(
        self, state: BlobState, spec: BlobSpec, source: Source, mine: list[int],
        pieces: Pieces,
    ) -> list[str]:  # fmt: skip
        """Fetch our claimed chunks (neighbours together); fill `pieces`; return errors."""
        errors: list[str] = []
        for run in _runs(mine):
            # Any other exception (the chunk table cannot be had) is not the chunks' fault:
            # their failure is not remembered.
            error, remember = "not fetched", False
            try:
                self._fetch_run(state, spec, source, run, pieces)
            except ChunkUnavailableError as err:
                errors.append(str(err))
                error, remember = str(err), True
            finally:
                for index in run:  # nobody may wait for ever on a chunk we claimed
                    if index not in pieces:
                        self._finish(state, index, b"", error, remember=remember)
        return errors

    def _fetch_run(
        self, state: BlobState, spec: BlobSpec, source: Source, run: list[int],
        pieces: Pieces,
    ) -> None:  # fmt: skip
        start, end = state.bounds(run[0])[0], state.bounds(run[-1])[1]
        try:
            data, endpoint = source.fetch(start, end)
        except Exception as err:
            raise ChunkUnavailableError(str(err)) from err
        self.counters.add("chunks_fetched", len(run))
        view = memoryview(data)
        bad = []
        for index in run:
            a, b = state.bounds(index)
            piece = view[a - start : b - start]
            if _digest(piece) == spec.table.digests[index]:
                pieces[index] = (a, piece)
                self._finish(state, index, piece)
            else:
                bad.append(index)
        if bad:
            source.mark_bad(endpoint)
        for index in bad:
            good = self._refetch(state, spec, source, index, endpoint)
            pieces[index] = (state.bounds(index)[0], good)
            self._finish(state, index, good)

    def _refetch(
        self, state: BlobState, spec: BlobSpec, source: Source, index: int, endpoint: str
    ) -> bytes | bytearray:
        a, b = state.bounds(index)
        for attempt in range(2, FETCH_TRIES + 1):
            metrics.VERIFY_FAILURES_REGISTRY.inc()
            self.counters.add("verify_failures")
            log.warning(
                "chunk %d (bytes %d-%d) of %s from %s does not match its digest; "
                "fetching it again (%d of %d)",
                index, a, b - 1, spec.digest, endpoint, attempt, FETCH_TRIES,
            )  # fmt: skip
            try:
                piece, endpoint = source.fetch(a, b, avoid=endpoint)
            except Exception as err:
                raise ChunkUnavailableError(str(err)) from err
            self.counters.add("chunks_fetched")
            if _digest(piece) == spec.table.digests[index]:
                return piece
            source.mark_bad(endpoint)
        metrics.VERIFY_FAILURES_REGISTRY.inc()
        self.counters.add("verify_failures")
        self.counters.add("verify_giveups")
        raise ChunkUnavailableError(
            f"chunk {index} (bytes {a}-{b - 1}) of {spec.digest} did not match its digest "
            f"in {FETCH_TRIES} fetches (last from {endpoint})"
        )

    def _finish(
        self, state: BlobState, index: int, data: Buffer, error: str = "", remember: bool = True
    ) -> None:
        """Store a verified chunk (when it fits) and hand it to whoever waits for it; a
        failure is remembered for FAILURE_MEMORY_SECONDS unless `remember` is False."""
        if data and not error:
            self._store(state, index, data)
        with self._lock:
            flight = self._flights.pop((state.key, index), None)
            if error and remember:
                self._failed[(state.key, index)] = (
                    time.monotonic() + FAILURE_MEMORY_SECONDS,
                    error,
                )
        if flight is not None:
            flight.data, flight.error = data, error
            flight.done.set()

    # -- storing and evicting -------------------------------------------------------------

    def _store(self, state: BlobState, index: int, data: Buffer) -> None:
        if not self.keep or len(data) > self.limit:
            return
        start, _ = state.bounds(index)
        try:
            wrote = os.pwrite(state.data_fd, data, start)
        except OSError as err:
            log.warning("cannot cache chunk %d of %s: %s", index, state.key, err)
            return
        if wrote != len(data):  # a full disk: the chunk is not cached (its bit stays off)
            log.warning("cannot cache chunk %d of %s: %d of %d bytes written",
                        index, state.key, wrote, len(data))  # fmt: skip
            return
        with self._lock:
            if state.has(index):
                return
            try:
                state.set_bit(index, True)
            except OSError as err:
                log.warning("cannot record chunk %d of %s: %s", index, state.key, err)
                return
            state.trusted[index] = 1
            self._lru[(state.key, index)] = len(data)
            self.used += len(data)
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used chunks until under the limit (lock held)."""
        if self.used <= self.limit:
            return
        for key in list(self._lru):
            if self.used <= self.limit:
                return
            if self._pins.get(key):
                continue
            state = self._states.get(key[0])
            if state is not None:
                self._remove(state, key[1])
                self.counters.add("evicted_chunks")

    def _remove(self, state: BlobState, index: int) -> None:
        length = self._lru.pop((state.key, index), None)
        if length is None:
            return
        self.used -= length
        state.open()
        state.set_bit(index, False)
        start, end = state.bounds(index)
        if not punch_hole(state.data_fd, start, end - start) and not self._punch_warned:
            self._punch_warned = True
            log.warning("cannot punch holes in %s: evicted chunks keep their disk space", state.dir)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        with self._lock:
            for state in self._states.values():
                state.close()


def _digest(data: Buffer) -> bytes:
    return hashlib.sha256(data).digest()


def _runs(indexes: list[int]) -> Iterator[list[int]]:
    """Consecutive indexes grouped: [1, 2, 3, 7, 8] -> [1, 2, 3], [7, 8]."""
    run: list[int] = []
    for index in indexes:
        if run and index != run[-1] + 1:
            yield run
            run = []
        run.append(index)
    if run:
        yield run
