"""apulld's chunk cache against a fake source: verification, coalescing, persistence,
damage after a crash, LRU eviction; and the FUSE protocol encoders it is served through."""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from pathlib import Path

import pytest

from apull_node.daemon import chunk_cache
from apull_node.daemon import fuse_protocol as fp
from apull_node.daemon.chunk_cache import BlobSpec, ChunkCache, ChunkUnavailableError
from apull_node.daemon.counters import Counters
from apull_node.image.chunks import ChunkTable

CHUNK = 4096
DATA = random.Random(5).randbytes(10 * CHUNK + 1000)  # 11 chunks, the last one short
SPEC = BlobSpec("sha256:" + "ab" * 32, len(DATA), ChunkTable.from_chunks(
    [DATA[i : i + CHUNK] for i in range(0, len(DATA), CHUNK)], CHUNK))  # fmt: skip


class FakeSource:
    def __init__(self, data: bytes = DATA, delay: float = 0.0) -> None:
        self.data = data
        self.delay = delay
        self.calls: list[tuple[int, int, str]] = []
        self.bad: dict[int, int] = {}  # offset -> times to flip it (-1: always)
        self.marked: list[str] = []
        self.lock = threading.Lock()

    def fetch(self, start: int, end: int, avoid: str = "") -> tuple[bytes, str]:
        with self.lock:
            self.calls.append((start, end, avoid))
        time.sleep(self.delay)
        piece = bytearray(self.data[start:end])
        for offset, times in list(self.bad.items()):
            if start <= offset < end and times:
                piece[offset - start] ^= 1
                self.bad[offset] = times - 1 if times > 0 else -1
        return bytes(piece), f"endpoint-{len(self.calls)}"

    def mark_bad(self, endpoint: str) -> None:
        self.marked.append(endpoint)


def make(root: Path, limit: int = 1 << 30) -> tuple[ChunkCache, Counters]:
    counters = Counters()
    return ChunkCache(root, limit, counters), counters


def test_reads_are_verified_cached_and_neighbours_fetched_together(tmp_path: Path) -> None:
    cache, counters = make(tmp_path)
    source = FakeSource()
    assert cache.read(SPEC, source, 100, 3 * CHUNK) == DATA[100 : 100 + 3 * CHUNK]
    assert source.calls == [(0, 4 * CHUNK, "")]  # chunks 0..3 in one request
    assert cache.read(SPEC, source, 0, 4 * CHUNK) == DATA[: 4 * CHUNK]
    assert len(source.calls) == 1
    assert counters.get("chunks_from_cache") == 4
    # The short last chunk; a read past the end is cut; beyond it, nothing.
    assert cache.read(SPEC, source, len(DATA) - 10, 100) == DATA[-10:]
    assert cache.read(SPEC, source, len(DATA), 10) == b""
    assert cache.used == 4 * CHUNK + 1000


def test_sequential_reads_fetch_ahead_in_growing_windows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(chunk_cache, "READ_AHEAD_BYTES", 4 * CHUNK)
    cache, _ = make(tmp_path)
    source = FakeSource()
    for offset in range(0, len(DATA), CHUNK):  # a streaming reader, one chunk at a time
        assert cache.read(SPEC, source, offset, CHUNK) == DATA[offset : offset + CHUNK]
    ranges = [(start // CHUNK, -(-end // CHUNK)) for start, end, _ in source.calls]
    assert ranges == [(0, 1), (1, 3), (3, 6), (6, 11)]
    # Jumping around fetches only what is read.
    cache, _ = make(tmp_path / "random")
    source = FakeSource()
    cache.read(SPEC, source, 5 * CHUNK, 10)
    cache.read(SPEC, source, 2 * CHUNK, 10)
    assert source.calls == [(5 * CHUNK, 6 * CHUNK, ""), (2 * CHUNK, 3 * CHUNK, "")]


@pytest.mark.parametrize("keep", [False, True])
def test_a_kernel_like_reader_that_stores_what_it_gets_keeps_its_read_ahead(
    tmp_path: Path, monkeypatch, keep: bool
) -> None:
    """The fscache backend writes all a read returns (the chunks fetched ahead included)
    into the kernel's cache file, and the kernel then asks for the first byte it lacks:
    with or without apulld's own copy (keep, for peers), the windows keep growing."""
    monkeypatch.setattr(chunk_cache, "READ_AHEAD_BYTES", 4 * CHUNK)
    cache = ChunkCache(tmp_path, 1 << 30, Counters(), keep=keep, caller_stores=True)
    source = FakeSource()
    offset = 0
    while offset < len(DATA):
        start, data = cache.read_span(SPEC, source, offset, CHUNK)
        assert data == DATA[start : start + len(data)] and start <= offset
        offset = start + len(data)  # the first byte the kernel's file lacks
    ranges = [(start // CHUNK, -(-end // CHUNK)) for start, end, _ in source.calls]
    assert ranges == [(0, 1), (1, 3), (3, 6), (6, 11)]


def test_prefetch_fetches_whole_windows_ahead_in_the_background(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(chunk_cache, "PREFETCH_WINDOW_BYTES", 2 * CHUNK)
    monkeypatch.setattr(chunk_cache, "PREFETCH_WINDOWS", 2)
    cache = ChunkCache(tmp_path, 1 << 30, Counters(), prefetch=True)
    source = FakeSource(delay=0.02)
    source.bad[6 * CHUNK + 1] = 1  # in a window fetched ahead: checked, fetched again
    for offset in range(0, len(DATA), CHUNK):  # a streaming reader, one chunk at a time
        assert cache.read(SPEC, source, offset, CHUNK) == DATA[offset : offset + CHUNK]
    cache.close()
    ranges = sorted((start // CHUNK, -(-end // CHUNK)) for start, end, _ in source.calls)
    # Its own first two chunks, then whole windows of 1, 2, 2... chunks claimed ahead of it
    # (each chunk fetched once, but for the bad one, fetched again by itself).
    assert ranges == [(0, 1), (1, 2), (2, 3), (3, 5), (5, 7), (6, 7), (7, 9), (9, 11)]
    assert len(source.marked) == 1
    # Everything fetched ahead was verified and stored: reading it all again costs nothing.
    again = ChunkCache(tmp_path, 1 << 30, Counters(), prefetch=True)
    quiet = FakeSource()
    assert again.read(SPEC, quiet, 0, len(DATA)) == DATA
    assert quiet.calls == []
    again.close()


def test_prefetch_failures_free_the_reader(tmp_path: Path) -> None:
    class Flaky(FakeSource):
        def fetch(self, start: int, end: int, avoid: str = "") -> tuple[bytes, str]:
            if start >= 2 * CHUNK:
                time.sleep(0.05)
                raise OSError("registry down")
            return super().fetch(start, end, avoid)

    cache = ChunkCache(tmp_path, 1 << 30, Counters(), prefetch=True)
    source = Flaky()
    assert cache.read(SPEC, source, 0, CHUNK) == DATA[:CHUNK]
    assert cache.read(SPEC, source, CHUNK, CHUNK) == DATA[CHUNK : 2 * CHUNK]
    with pytest.raises(ChunkUnavailableError, match="registry down"):
        cache.read(SPEC, source, 2 * CHUNK, CHUNK)  # claimed ahead; its fetch failed
    cache.close()


def test_reads_of_checked_cached_chunks_are_whole(tmp_path: Path) -> None:
    cache, counters = make(tmp_path)
    source = FakeSource()
    cache.read(SPEC, source, 0, len(DATA))
    for offset, size in [(0, len(DATA)), (100, 3 * CHUNK), (CHUNK - 1, 2), (len(DATA) - 5, 99)]:
        assert bytes(cache.read(SPEC, source, offset, size)) == DATA[offset : offset + size]
    assert len(source.calls) == 1
    assert counters.get("chunks_from_cache") == 11 + 4 + 2 + 1


def test_concurrent_readers_of_a_chunk_share_one_fetch(tmp_path: Path) -> None:
    cache, _ = make(tmp_path)
    source = FakeSource(delay=0.2)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.read(SPEC, source, 5000, 100)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [DATA[5000:5100]] * 8
    assert source.calls == [(CHUNK, 2 * CHUNK, "")]


def test_a_bad_chunk_is_fetched_again_elsewhere(tmp_path: Path) -> None:
    cache, counters = make(tmp_path)
    source = FakeSource()
    source.bad[CHUNK + 7] = 1
    assert cache.read(SPEC, source, 0, 3 * CHUNK) == DATA[: 3 * CHUNK]
    assert source.calls == [(0, 3 * CHUNK, ""), (CHUNK, 2 * CHUNK, "endpoint-1")]
    assert source.marked == ["endpoint-1"] and counters.get("verify_failures") == 1


def test_a_chunk_that_stays_bad_fails_and_is_not_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(chunk_cache, "FAILURE_MEMORY_SECONDS", 0.3)
    cache, counters = make(tmp_path)
    source = FakeSource()
    source.bad[2 * CHUNK] = -1
    with pytest.raises(ChunkUnavailableError, match=r"chunk 2 .* did not match its digest in 3"):
        cache.read(SPEC, source, 0, 3 * CHUNK)
    assert counters.get("verify_failures") == 3 and counters.get("verify_giveups") == 1
    assert cache.used == 2 * CHUNK  # the good neighbours are kept
    source.bad.clear()
    calls = len(source.calls)
    with pytest.raises(ChunkUnavailableError):  # failed moments ago: fails again at once
        cache.read(SPEC, source, 2 * CHUNK + 100, 10)
    assert len(source.calls) == calls
    time.sleep(0.3)
    assert cache.read(SPEC, source, 2 * CHUNK, CHUNK) == DATA[2 * CHUNK : 3 * CHUNK]


def test_source_errors_fail_the_read_and_free_the_waiters(tmp_path: Path) -> None:
    cache, _ = make(tmp_path)

    class Down(FakeSource):
        def fetch(self, start: int, end: int, avoid: str = "") -> tuple[bytes, str]:
            time.sleep(0.1)
            raise OSError("registry down")

    errors: list[str] = []

    def read() -> None:
        try:
            cache.read(SPEC, Down(), 0, 10)
        except ChunkUnavailableError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert errors == ["registry down"] * 3


def test_cached_chunks_survive_a_restart_and_damage_is_caught(tmp_path: Path) -> None:
    cache, _ = make(tmp_path)
    cache.read(SPEC, FakeSource(), 0, len(DATA))
    cache.close()
    # A torn write: the bitmap says chunk 3 is there, the data file disagrees.
    data_file = tmp_path / SPEC.key / "data"
    with open(data_file, "r+b") as stream:
        stream.seek(3 * CHUNK + 10)
        stream.write(b"\0\1\2")
    again, counters = make(tmp_path)
    assert again.used == len(DATA)
    source = FakeSource()
    assert again.read(SPEC, source, 0, len(DATA)) == DATA
    assert source.calls == [(3 * CHUNK, 4 * CHUNK, "")]
    assert counters.get("cache_damaged_chunks") == 1
    assert counters.get("chunks_from_cache") == 10


def test_least_recently_used_chunks_go_first(tmp_path: Path) -> None:
    cache, counters = make(tmp_path, limit=3 * CHUNK)
    source = FakeSource()
    for index in (0, 1, 2, 0, 3):  # chunk 1 is then the least recently used
        assert cache.read(SPEC, source, index * CHUNK, 10) == DATA[index * CHUNK :][:10]
    assert counters.get("evicted_chunks") == 1 and cache.used == 3 * CHUNK
    before = len(source.calls)
    cache.read(SPEC, source, 0, 10)
    cache.read(SPEC, source, 2 * CHUNK, 10)
    assert len(source.calls) == before
    cache.read(SPEC, source, CHUNK, 10)
    assert source.calls[-1] == (CHUNK, 2 * CHUNK, "")
    blocks = os.stat(tmp_path / SPEC.key / "data").st_blocks * 512
    assert blocks <= 4 * CHUNK


def test_a_changed_blob_size_resets_its_entry(tmp_path: Path) -> None:
    cache, _ = make(tmp_path)
    cache.read(SPEC, FakeSource(), 0, 10)
    shorter = DATA[: 2 * CHUNK]
    spec = BlobSpec(SPEC.digest, len(shorter), ChunkTable.from_chunks(
        [shorter[:CHUNK], shorter[CHUNK:]], CHUNK))  # fmt: skip
    assert cache.read(spec, FakeSource(shorter), 0, 2 * CHUNK) == shorter
    assert cache.used == 2 * CHUNK


# -- the FUSE protocol encoders ---------------------------------------------------------------


def test_request_header_and_replies() -> None:
    body = b"name\0"
    raw = fp.IN_HEADER.pack(fp.IN_HEADER.size + len(body), fp.Op.LOOKUP, 7, 1, 0, 0, 42, 0, 0)
    request = fp.parse_request(raw + body)
    assert (request.opcode, request.unique, request.nodeid, request.pid) == (1, 7, 1, 42)
    assert fp.parse_name(request.body) == "name" and not request.resent
    with pytest.raises(fp.ProtocolError):
        fp.parse_request(raw)  # shorter than its header says
    assert b"".join(fp.error_reply(7, 2)) == struct.pack("<IiQ", 16, -2, 7)
    assert b"".join(fp.notification(fp.Notify.RESEND)) == struct.pack("<IiQ", 16, 7, 0)
    assert len(fp.entry_out(fp.Attr(5, 10, fp.S_IFREG | 0o444), 1.5, 2.0)) == 128
    assert len(fp.attr_out(fp.Attr(5, 10, fp.S_IFREG | 0o444), 2.0)) == 104


def test_init_answer_keeps_the_smaller_minor_and_known_flags() -> None:
    kernel = fp.InitIn(7, 45, 131072, fp.ASYNC_READ | fp.MAX_PAGES | (1 << 3), 0)
    major, minor, readahead, flags = struct.unpack_from("<IIII", fp.init_out(
        kernel, max_pages=256, max_background=16))  # fmt: skip
    assert (major, minor, readahead, flags) == (7, fp.MINOR, 131072, fp.ASYNC_READ | fp.MAX_PAGES)
    assert len(fp.init_out(kernel, max_pages=256, max_background=16)) == 64


def test_dirents_are_padded_and_resume_at_an_offset() -> None:
    entries = [(1, fp.DT_DIR, "."), (1, fp.DT_DIR, ".."), (9, fp.DT_REG, "blob-a")]
    packed = fp.dirents(entries, 0, 4096)
    assert len(packed) == 3 * 32  # 24-byte head + name, padded to 8
    ino, off, namelen, kind = struct.unpack_from("<QQII", packed, 64)
    assert (ino, off, namelen, kind) == (9, 3, 6, fp.DT_REG)
    assert packed[88:94] == b"blob-a"
    assert fp.dirents(entries, 2, 4096) == packed[64:]
    assert fp.dirents(entries, 0, 40) == packed[:32]  # only what fits
