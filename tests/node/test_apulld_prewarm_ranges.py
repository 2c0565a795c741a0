"""Prewarm's arithmetic: start-up ranges to chunks, chunks to registry runs, and what a
sparse cache file holds (SEEK_DATA / SEEK_HOLE on a real file)."""

from __future__ import annotations

import os
from pathlib import Path

from apull_node.daemon.fscache_backend import covered, data_extents
from apull_node.daemon.image_prewarm import chunk_indexes, runs

CHUNK = 65536


def test_ranges_name_every_chunk_they_touch_and_stop_at_the_blob_end() -> None:
    assert chunk_indexes([(0, 1)], CHUNK, 10 * CHUNK) == {0}
    assert chunk_indexes([(CHUNK - 1, 2)], CHUNK, 10 * CHUNK) == {0, 1}
    assert chunk_indexes([(3 * CHUNK, CHUNK)], CHUNK, 10 * CHUNK) == {3}
    assert chunk_indexes([(9 * CHUNK, 5 * CHUNK)], CHUNK, 9 * CHUNK + 7) == {9}
    assert chunk_indexes([(20 * CHUNK, 1), (5, 0)], CHUNK, 10 * CHUNK) == set()


def test_runs_join_neighbours_up_to_a_size() -> None:
    assert runs([], CHUNK, 4 * CHUNK) == []
    assert runs([3, 1, 2, 7], CHUNK, 4 * CHUNK) == [(CHUNK, 3 * CHUNK), (7 * CHUNK, CHUNK)]
    assert runs(list(range(6)), CHUNK, 4 * CHUNK) == [(0, 4 * CHUNK), (4 * CHUNK, 2 * CHUNK)]
    assert runs([0, 1], CHUNK, 1) == [(0, CHUNK), (CHUNK, CHUNK)]


def test_a_sparse_files_data_is_found_chunk_by_chunk(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    size = 8 * CHUNK
    with open(path, "wb") as stream:
        stream.truncate(size)
    fd = os.open(path, os.O_RDWR)
    try:
        assert data_extents(fd, size) == []
        os.pwrite(fd, b"x" * (2 * CHUNK), 2 * CHUNK)
        os.pwrite(fd, b"y" * CHUNK, 7 * CHUNK)
        os.fsync(fd)
        extents = data_extents(fd, size)
        held = [covered(extents, i * CHUNK, (i + 1) * CHUNK) for i in range(8)]
    finally:
        os.close(fd)
    assert held == [False, False, True, True, False, False, False, True]


def test_covered_needs_the_whole_range() -> None:
    extents = [(0, 100), (100, 200), (300, 400)]
    assert covered(extents, 0, 200)
    assert covered(extents, 150, 200)
    assert not covered(extents, 150, 301)
    assert not covered(extents, 250, 260)
    assert not covered([], 0, 1)


def test_start_up_reads_are_merged_and_kept_for_the_window_only() -> None:
    from apull_node.daemon.startup_reads import StartupReads, merged

    assert merged([(10, 5), (0, 4), (4, 2), (20, 1)]) == [(0, 6), (10, 5), (20, 1)]
    reads = StartupReads(window=0.2)
    reads.saw("sha256:a", 4096, 4096)
    reads.saw("sha256:a", 0, 4096)
    reads.saw("sha256:b", 0, 0)
    assert reads.sets() == {"sha256:a": [[0, 8192]]}
    import time

    time.sleep(0.3)
    reads.saw("sha256:a", 65536, 10)  # after the window: not a start-up read
    reads.saw("sha256:c", 65536, 10)  # first read of another blob: its window starts
    assert reads.sets() == {"sha256:a": [[0, 8192]], "sha256:c": [[65536, 10]]}


def test_held_chunks_in_one_pass_agree_with_covered() -> None:
    from apull_node.daemon.fscache_backend import held_chunks

    size = 10 * CHUNK + 100
    cases = [
        [],
        [(0, size)],
        [(CHUNK, 3 * CHUNK), (5 * CHUNK + 4096, 7 * CHUNK), (10 * CHUNK, size)],
        [(CHUNK // 2, 2 * CHUNK), (2 * CHUNK, 4 * CHUNK)],  # a chunk across two extents
    ]
    for extents in cases:
        expected = [covered(extents, i * CHUNK, min(size, (i + 1) * CHUNK)) for i in range(11)]
        assert held_chunks(extents, size, CHUNK) == expected, extents
