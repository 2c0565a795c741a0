"""Chunk digest tables: layout, round trip, and range verification."""

from __future__ import annotations

import hashlib
import io
import os
import struct

import pytest

from apull_node.image.chunks import (
    HEADER_SIZE,
    MAGIC,
    ChunkTable,
    ChunkTableError,
    ChunkVerifyError,
    verify_range,
)

SIZE = 4096


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE * 5 + 1000)  # five whole chunks and a short one


@pytest.fixture(scope="module")
def table(data: bytes) -> ChunkTable:
    return ChunkTable.from_stream(io.BytesIO(data), SIZE)


def test_table_layout(data, table):
    raw = table.to_bytes()
    magic, version, chunk_size, data_size, count = struct.unpack_from("<8sIIQQ", raw)
    assert (magic, version, chunk_size, data_size, count) == (MAGIC, 1, SIZE, len(data), 6)
    assert len(raw) == HEADER_SIZE + 6 * 32
    assert raw[HEADER_SIZE : HEADER_SIZE + 32] == hashlib.sha256(data[:SIZE]).digest()
    assert raw[-32:] == hashlib.sha256(data[5 * SIZE :]).digest()


def test_round_trip_and_determinism(data, table, tmp_path):
    raw = table.to_bytes()
    assert ChunkTable.from_bytes(raw) == table
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert ChunkTable.from_file(path, SIZE).to_bytes() == raw


def test_empty_blob_has_an_empty_table():
    table = ChunkTable.from_stream(io.BytesIO(b""), SIZE)
    assert table.digests == () and ChunkTable.from_bytes(table.to_bytes()) == table


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: b"NOTMAGIC" + raw[8:], "magic"),
        (lambda raw: raw[:8] + struct.pack("<I", 2) + raw[12:], "version"),
        (lambda raw: raw[:12] + struct.pack("<I", 5000) + raw[16:], "power of two"),
        (lambda raw: raw[:-1], "bytes"),
        (lambda raw: raw[:16] + struct.pack("<Q", 1) + raw[24:], "digests for"),
        (lambda raw: raw[:10], "header"),
    ],
)
def test_malformed_tables_are_refused(table, mutate, message):
    with pytest.raises(ChunkTableError, match=message):
        ChunkTable.from_bytes(mutate(table.to_bytes()))


def test_verify_whole_and_partial_ranges(data, table):
    verify_range(table, 0, data)
    verify_range(table, SIZE, data[SIZE : 3 * SIZE])
    verify_range(table, 5 * SIZE, data[5 * SIZE :])  # the short last chunk
    verify_range(table, 4 * SIZE, memoryview(data)[4 * SIZE :])


def test_verify_detects_a_flipped_byte(data, table):
    flipped = bytearray(data[SIZE : 3 * SIZE])
    flipped[SIZE + 17] ^= 0x01
    with pytest.raises(ChunkVerifyError, match="chunk 2 "):
        verify_range(table, SIZE, bytes(flipped))


def test_verify_detects_a_wrong_offset(data, table):
    with pytest.raises(ChunkVerifyError, match="chunk 2 "):
        verify_range(table, 2 * SIZE, data[SIZE : 2 * SIZE])


@pytest.mark.parametrize(
    ("offset", "length", "message"),
    [
        (100, SIZE, "boundary"),
        (0, SIZE + 1, "inside a chunk"),
        (5 * SIZE, 1001, "past"),
        (0, 0, "empty"),
        (-SIZE, SIZE, "boundary"),
    ],
)
def test_unverifiable_ranges_are_refused(data, table, offset, length, message):
    padded = data + b"\0"
    with pytest.raises(ChunkVerifyError, match=message):
        verify_range(table, offset, padded[max(offset, 0) : max(offset, 0) + length])


def test_aligned_range_widens_to_chunks(data, table):
    assert table.aligned_range(SIZE + 5, 10) == (SIZE, 2 * SIZE)
    assert table.aligned_range(0, SIZE) == (0, SIZE)
    assert table.aligned_range(5 * SIZE + 10, 20) == (5 * SIZE, len(data))
    assert table.chunk_bounds(5) == (5 * SIZE, len(data))
    with pytest.raises(ChunkVerifyError):
        table.aligned_range(len(data) - 1, 2)


def test_chunk_size_must_be_a_power_of_two_from_4096():
    for bad in (0, 2048, 4097, 3 * 4096, 1 << 31):
        with pytest.raises(ChunkTableError):
            ChunkTable(bad, 0, ())
    ChunkTable(1 << 30, 0, ())
