"""The blobs the snapshotter told apulld about, kept in memory and in one JSON file.

Each blob is an fscache cookie: `blob_id` is the cookie key, `domain_id` (shared blobs) or
`fsid` (one image) the volume key `erofs,<...>`; with the file backend it is also the file
`<fuse mountpoint>/<blob_id>` that EROFS is mounted from. The file is rewritten atomically on every
change (temp file, fsync, rename), so a restart restores exactly the acknowledged state.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from apull_node.image.format import check_chunk_size

# fscache keys and EROFS mount options: no commas, slashes, spaces; at most 255 bytes.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,254}")
_REGISTRY = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?")
_REPO_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_REPO_PART}(?:/{_REPO_PART})*")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_FILE_VERSION = 1


class BlobConfigError(ValueError):
    """A blob config field is missing or wrong; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class BlobStoreError(Exception):
    """The blobs file cannot be read or written; the message names it."""


@dataclass(frozen=True)
class BlobConfig:
    blob_id: str
    registry: str
    repo: str
    digest: str
    size: int
    domain_id: str = ""
    fsid: str = ""
    # The layer's chunk digest table (apull image format): what on-demand serving verifies
    # every fetched range against. Optional in the schema; the file backend requires it.
    chunk_table: str = ""
    chunk_table_size: int = 0
    chunk_size: int = 0

    @property
    def volume(self) -> str:
        """The fscache volume this blob lives in: its domain, else its image's fsid."""
        return self.domain_id or self.fsid

    def to_json(self) -> dict[str, Any]:
        """All fields; the chunk table ones only when set (older snapshotters send none)."""
        document = asdict(self)
        for name in _OPTIONAL:
            if not document[name]:
                del document[name]
        return document


_FIELDS = {f.name for f in fields(BlobConfig)}
_REQUIRED = ("blob_id", "registry", "repo", "digest", "size")
_OPTIONAL = ("chunk_table", "chunk_table_size", "chunk_size")


def _text(raw: dict[str, Any], name: str, pattern: re.Pattern[str], what: str) -> str:
    value = raw.get(name, "")
    if not isinstance(value, str):
        raise BlobConfigError(name, f"expected a string, got {value!r}")
    if value and not pattern.fullmatch(value):
        raise BlobConfigError(name, f"{value!r} is not {what}")
    return value


def parse_blob_config(raw: object) -> BlobConfig:
    """Validate a decoded JSON body; BlobConfigError names the first bad field."""
    if not isinstance(raw, dict):
        raise BlobConfigError("body", "expected a JSON object")
    for name in raw:
        if name not in _FIELDS:
            raise BlobConfigError(name, f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    for name in _REQUIRED:
        if raw.get(name) in (None, ""):
            raise BlobConfigError(name, "required")
    size = raw["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise BlobConfigError("size", f"expected a positive integer, got {size!r}")
    for name in ("chunk_table_size", "chunk_size"):
        value = raw.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BlobConfigError(name, f"expected a non-negative integer, got {value!r}")
    if raw.get("chunk_size"):
        try:
            check_chunk_size(raw["chunk_size"])
        except ValueError as err:
            raise BlobConfigError("chunk_size", str(err)) from None
    key = "letters, digits and ._:+- (at most 255)"
    config = BlobConfig(
        blob_id=_text(raw, "blob_id", _KEY, key),
        registry=_text(raw, "registry", _REGISTRY, "host[:port] (no scheme, no path)"),
        repo=_text(raw, "repo", _REPO, "a repository name (lowercase path)"),
        digest=_text(raw, "digest", _DIGEST, "sha256:<64 hex> or sha512:<128 hex>"),
        size=size,
        domain_id=_text(raw, "domain_id", _KEY, key),
        fsid=_text(raw, "fsid", _KEY, key),
        chunk_table=_text(raw, "chunk_table", _DIGEST, "sha256:<64 hex> or sha512:<128 hex>"),
        chunk_table_size=raw.get("chunk_table_size", 0),
        chunk_size=raw.get("chunk_size", 0),
    )
    if not config.volume:
        raise BlobConfigError("domain_id", "one of domain_id or fsid is required")
    return config


@dataclass(frozen=True)
class PrefetchRequest:
    registry: str
    repo: str
    manifest: str
    #: The manifest's bytes when the caller has them (containerd's content store): then
    #: apulld need not fetch them; still checked against `manifest` before any use.
    manifest_data: bytes | None = None


def parse_prefetch_request(raw: object, max_manifest: int) -> PrefetchRequest:
    """A prefetch request body: registry, repo, manifest digest, and optionally the
    manifest's bytes (`manifest_data`, base64); BlobConfigError names the first bad field."""
    if not isinstance(raw, dict):
        raise BlobConfigError("body", "expected a JSON object")
    known = ("manifest", "manifest_data", "registry", "repo")
    for name in raw:
        if name not in known:
            raise BlobConfigError(name, f"unknown field (known: {', '.join(known)})")
    for name in ("registry", "repo", "manifest"):
        if raw.get(name) in (None, ""):
            raise BlobConfigError(name, "required")
    data = None
    if raw.get("manifest_data") is not None:
        encoded = raw["manifest_data"]
        if not isinstance(encoded, str) or len(encoded) > (max_manifest + 2) // 3 * 4:
            raise BlobConfigError("manifest_data", f"base64 of at most {max_manifest} bytes")
        try:
            data = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise BlobConfigError("manifest_data", "not base64") from None
    return PrefetchRequest(
        _text(raw, "registry", _REGISTRY, "host[:port] (no scheme, no path)"),
        _text(raw, "repo", _REPO, "a repository name (lowercase path)"),
        _text(raw, "manifest", _DIGEST, "sha256:<64 hex> or sha512:<128 hex>"),
        data,
    )


#: Most start-up ranges one warm request may name.
MAX_STARTUP_RANGES = 65536


@dataclass(frozen=True)
class WarmRequest:
    image: PrefetchRequest
    whole: bool
    #: layer digest -> [(offset, length), ...]: the image's start-up set.
    startup: dict[str, list[tuple[int, int]]]


def parse_warm_request(raw: object, max_manifest: int) -> WarmRequest:
    """A warm request body: the prefetch request's fields, `whole` (bool, default true) and
    `startup` ({layer digest: [[offset, length], ...]}); BlobConfigError names the field."""
    if not isinstance(raw, dict):
        raise BlobConfigError("body", "expected a JSON object")
    known = ("manifest", "manifest_data", "registry", "repo", "startup", "whole")
    for name in raw:
        if name not in known:
            raise BlobConfigError(name, f"unknown field (known: {', '.join(known)})")
    image = parse_prefetch_request(
        {k: v for k, v in raw.items() if k not in ("startup", "whole")}, max_manifest
    )
    whole = raw.get("whole", True)
    if not isinstance(whole, bool):
        raise BlobConfigError("whole", "true or false")
    startup: dict[str, list[tuple[int, int]]] = {}
    given = raw.get("startup", {})
    if not isinstance(given, dict):
        raise BlobConfigError("startup", "an object of layer digest: [[offset, length], ...]")
    count = 0
    for digest, ranges in given.items():
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise BlobConfigError("startup", f"{digest!r} is not a layer digest")
        if not isinstance(ranges, list):
            raise BlobConfigError(f"startup.{digest}", "a list of [offset, length]")
        pairs = []
        for pair in ranges:
            numbers = isinstance(pair, list) and len(pair) == 2
            numbers = numbers and all(type(n) is int and n >= 0 for n in pair)
            if not numbers or pair[1] == 0:
                raise BlobConfigError(
                    f"startup.{digest}", f"{pair!r} is not [offset, length] (length > 0)"
                )
            pairs.append((pair[0], pair[1]))
        count += len(pairs)
        if count > MAX_STARTUP_RANGES:
            raise BlobConfigError("startup", f"more than {MAX_STARTUP_RANGES} ranges")
        startup[digest] = pairs
    return WarmRequest(image, whole, startup)


class BlobRegistry:
    """Thread-safe blob table persisted to `path`."""

    def __init__(self, path: Path, blobs: dict[str, BlobConfig] | None = None) -> None:
        self.path = path
        self._blobs = dict(blobs or {})
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> BlobRegistry:
        """Restore the table; a missing file is an empty table, a broken one an error."""
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as err:
            raise BlobStoreError(f"{path}: cannot read: {err}") from err
        if not isinstance(document, dict) or document.get("version") != _FILE_VERSION:
            raise BlobStoreError(f"{path}: not an apulld blobs file (version {_FILE_VERSION})")
        blobs: dict[str, BlobConfig] = {}
        for index, raw in enumerate(document.get("blobs", [])):
            try:
                config = parse_blob_config(raw)
            except BlobConfigError as err:
                raise BlobStoreError(f"{path}: blobs[{index}]: {err}") from err
            blobs[config.blob_id] = config
        return cls(path, blobs)

    def __len__(self) -> int:
        return len(self._blobs)

    def all(self) -> list[BlobConfig]:
        with self._lock:
            return sorted(self._blobs.values(), key=lambda blob: blob.blob_id)

    def find(self, volume: str, blob_id: str) -> BlobConfig | None:
        """The blob behind an fscache OPEN (volume key without `erofs,`, cookie key)."""
        with self._lock:
            config = self._blobs.get(blob_id)
        return config if config is not None and volume in (config.domain_id, config.fsid) else None

    def put(self, config: BlobConfig) -> bool:
        """Add or replace; True when the blob was new. Persisted before returning."""
        with self._lock:
            previous = self._blobs.get(config.blob_id)
            self._blobs[config.blob_id] = config
            try:
                self._save()
            except BlobStoreError:
                self._restore(config.blob_id, previous)
                raise
            return previous is None

    def delete(self, blob_id: str) -> bool:
        """Remove; False when unknown. Persisted before returning."""
        with self._lock:
            previous = self._blobs.pop(blob_id, None)
            if previous is None:
                return False
            try:
                self._save()
            except BlobStoreError:
                self._restore(blob_id, previous)
                raise
            return True

    def _restore(self, blob_id: str, previous: BlobConfig | None) -> None:
        if previous is None:
            self._blobs.pop(blob_id, None)
        else:
            self._blobs[blob_id] = previous

    def _save(self) -> None:
        document = {
            "version": _FILE_VERSION,
            "blobs": [self._blobs[key].to_json() for key in sorted(self._blobs)],
        }
        directory = self.path.parent
        try:
            fd, temp = tempfile.mkstemp(prefix=".blobs-", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "w") as stream:
                    json.dump(document, stream, indent=1, sort_keys=True)
                    stream.write("\n")
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise BlobStoreError(f"{self.path}: cannot write: {err}") from err
