"""apulld: the blob table, its lookup by fscache keys and its atomic file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apull_node.daemon.blob_registry import (
    BlobConfig,
    BlobConfigError,
    BlobRegistry,
    BlobStoreError,
    parse_blob_config,
)

RAW = {
    "blob_id": "b1",
    "fsid": "img1",
    "registry": "[::1]:5000",
    "repo": "team/app_x",
    "digest": "sha512:" + "0" * 128,
    "size": 4096,
}


def test_parse_accepts_a_full_config_and_keys_the_volume() -> None:
    config = parse_blob_config(RAW)
    assert config == BlobConfig("b1", "[::1]:5000", "team/app_x", RAW["digest"], 4096, "", "img1")
    assert config.volume == "img1"
    assert parse_blob_config({**RAW, "domain_id": "shared"}).volume == "shared"


def test_parse_error_carries_the_field() -> None:
    with pytest.raises(BlobConfigError) as caught:
        parse_blob_config({**RAW, "registry": "r.example/path"})
    assert caught.value.field == "registry"


def test_find_matches_the_open_request_keys(tmp_path: Path) -> None:
    registry = BlobRegistry(tmp_path / "blobs.json")
    registry.put(parse_blob_config({**RAW, "domain_id": "shared"}))
    assert registry.find("shared", "b1") is not None
    assert registry.find("img1", "b1") is not None
    assert registry.find("other", "b1") is None
    assert registry.find("shared", "b2") is None


def test_failed_write_rolls_back_memory_and_leaves_no_temp_file(tmp_path: Path) -> None:
    registry = BlobRegistry(tmp_path / "blobs.json")
    assert registry.put(parse_blob_config(RAW)) is True
    # The rename onto the file fails when a non-empty directory sits in its place.
    (tmp_path / "blobs.json").unlink()
    (tmp_path / "blobs.json").mkdir()
    (tmp_path / "blobs.json" / "x").write_text("")
    with pytest.raises(BlobStoreError, match="cannot write"):
        registry.put(parse_blob_config({**RAW, "blob_id": "b2"}))
    with pytest.raises(BlobStoreError, match="cannot write"):
        registry.delete("b1")
    with pytest.raises(BlobStoreError, match="cannot write"):
        registry.put(parse_blob_config({**RAW, "size": 1}))
    assert registry.all() == [parse_blob_config(RAW)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs.json"]


def test_load_refuses_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "blobs.json"
    assert len(BlobRegistry.load(path)) == 0
    path.write_text(json.dumps({"blobs": []}))
    with pytest.raises(BlobStoreError, match="not an apulld blobs file"):
        BlobRegistry.load(path)
    path.write_text("[")
    with pytest.raises(BlobStoreError, match="cannot read"):
        BlobRegistry.load(path)


def test_chunk_table_fields_are_validated_and_kept_when_set(tmp_path: Path) -> None:
    table = "sha256:" + "c" * 64
    config = parse_blob_config({**RAW, "chunk_table": table, "chunk_table_size": 96,
                                "chunk_size": 65536})  # fmt: skip
    assert (config.chunk_table, config.chunk_table_size, config.chunk_size) == (table, 96, 65536)
    assert config.to_json()["chunk_table"] == table
    assert "chunk_table" not in parse_blob_config(RAW).to_json()  # unset: left out
    for change, field in (
        ({"chunk_table": "md5:abc"}, "chunk_table"),
        ({"chunk_size": 1000}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"chunk_table_size": -1}, "chunk_table_size"),
    ):
        with pytest.raises(BlobConfigError) as caught:
            parse_blob_config({**RAW, **change})
        assert caught.value.field == field
    registry = BlobRegistry(tmp_path / "blobs.json")
    registry.put(config)
    assert BlobRegistry.load(tmp_path / "blobs.json").all() == [config]
