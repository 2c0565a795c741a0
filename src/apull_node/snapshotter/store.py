"""Snapshot metadata in SQLite (`<root>/metadata.db`): names, kinds, parents, labels, usage.

One connection, one transaction at a time (a lock serialises the gRPC threads); WAL journal
with synchronous=FULL, so a transaction that returned is on disk. Ids come from AUTOINCREMENT
and are never reused once committed: a snapshot's directory is `snapshots/<id>` and keeps its
id when it is committed under a new name, so children point at their parent by id.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from apull_node.snapshotter.diskusage import Usage
from apull_node.snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

SCHEMA_VERSION = 1
#: containerd refuses labels whose key and value together exceed this many bytes.
MAX_LABEL_SIZE = 4096

_SCHEMA = """
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX snapshots_by_parent ON snapshots(parent_id);
CREATE TABLE labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
) WITHOUT ROWID;
"""


class Kind(enum.IntEnum):
    """Same numbers as the wire enum containerd.services.snapshots.v1.Kind."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    name: str
    parent: str  # the parent's name; "" for none
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """What mounts are computed from: the directory id and the ids of all parents."""

    id: str
    kind: Kind
    parent_ids: tuple[str, ...] = ()  # nearest parent first


class _Row(NamedTuple):
    id: int
    name: str
    parent_id: int | None
    kind: int
    created_ns: int
    updated_ns: int
    size: int
    inodes: int


_COLUMNS = "id, name, parent_id, kind, created_ns, updated_ns, size, inodes"


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgumentError(
                f"label {key[:10]!r}...: key and value exceed {MAX_LABEL_SIZE} bytes"
            )


class MetaStore:
    """The database; use `transaction()` for every read and write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self.transaction():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version == SCHEMA_VERSION:
                return
            if version != 0:
                raise RuntimeError(
                    f"{self.path}: schema version {version}, this snapshotter knows "
                    f"{SCHEMA_VERSION}; refusing to touch it"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Commit when the block ends normally, roll back when it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Transaction:
    """The metadata operations, inside one transaction (containerd's storage package, ours)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- reads

    def _row(self, name: str) -> _Row | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE name = ?", (name,))
        found = row.fetchone()
        return _Row(*found) if found else None

    def _row_by_id(self, snapshot_id: int) -> _Row:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,))
        return _Row(*row.fetchone())

    def _require(self, name: str) -> _Row:
        row = self._row(name)
        if row is None:
            raise NotFoundError(f"snapshot {name!r} does not exist")
        return row

    def _labels(self, snapshot_id: int) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT key, value FROM labels WHERE snapshot_id = ? ORDER BY key", (snapshot_id,)
        )
        return dict(rows.fetchall())

    def _info(self, row: _Row) -> Info:
        parent = self._row_by_id(row.parent_id).name if row.parent_id is not None else ""
        return Info(
            name=row.name,
            parent=parent,
            kind=Kind(row.kind),
            created_ns=row.created_ns,
            updated_ns=row.updated_ns,
            labels=self._labels(row.id),
        )

    def _parent_ids(self, parent_id: int | None) -> tuple[str, ...]:
        chain = []
        while parent_id is not None:
            chain.append(str(parent_id))
            parent_id = self._row_by_id(parent_id).parent_id
        return tuple(chain)

    def info(self, name: str) -> tuple[str, Info, Usage]:
        """The snapshot's id, Info and stored usage (zero unless committed)."""
        row = self._require(name)
        return str(row.id), self._info(row), Usage(size=row.size, inodes=row.inodes)

    def snapshot(self, name: str) -> Snapshot:
        """An active snapshot or view, for its mounts."""
        row = self._require(name)
        if row.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPreconditionError(f"snapshot {name!r} is not active or a view")
        return Snapshot(str(row.id), Kind(row.kind), self._parent_ids(row.parent_id))

    def infos(self) -> list[Info]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY name").fetchall()
        return [self._info(_Row(*row)) for row in rows]

    def chain(self, name: str) -> list[tuple[str, Info]]:
        """Snapshot `name` and all its parents, nearest first: id and Info of each."""
        found = []
        row: _Row | None = self._require(name)
        while row is not None:
            found.append((str(row.id), self._info(row)))
            row = self._row_by_id(row.parent_id) if row.parent_id is not None else None
        return found

    def labelled(self, key: str, value: str | None = None) -> list[tuple[str, Info]]:
        """Snapshots carrying label `key` (with `value`, when given): id and Info, by id."""
        query = f"SELECT {', '.join('s.' + c.strip() for c in _COLUMNS.split(','))}" + (
            " FROM snapshots s JOIN labels l ON l.snapshot_id = s.id WHERE l.key = ?"
        )
        args: tuple[str, ...] = (key,)
        if value is not None:
            query += " AND l.value = ?"
            args += (value,)
        rows = [_Row(*row) for row in self._db.execute(query + " ORDER BY s.id", args)]
        return [(str(row.id), self._info(row)) for row in rows]

    def ids(self) -> set[str]:
        return {str(i) for (i,) in self._db.execute("SELECT id FROM snapshots").fetchall()}

    # -- writes

    def _set_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        """Replace all labels; empty values are dropped, as containerd does."""
        self._db.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        self._db.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(snapshot_id, k, v) for k, v in labels.items() if v],
        )

    def create(
        self,
        kind: Kind,
        name: str,
        parent: str,
        labels: Mapping[str, str],
        usage: Usage | None = None,
    ) -> Snapshot:
        """Record a new active snapshot or view on top of the committed `parent` (or none);
        or, given its usage, a committed one at once (a remote layer: nothing to unpack)."""
        allowed = (Kind.COMMITTED,) if usage is not None else (Kind.ACTIVE, Kind.VIEW)
        if kind not in allowed:
            raise InvalidArgumentError(f"cannot create a snapshot of kind {kind.name}")
        if not name:
            raise InvalidArgumentError("snapshot key must not be empty")
        parent_row = None
        if parent:
            parent_row = self._row(parent)
            if parent_row is None:
                raise NotFoundError(f"parent snapshot {parent!r} does not exist")
            if parent_row.kind != Kind.COMMITTED:
                raise InvalidArgumentError(f"parent {parent!r} is not a committed snapshot")
        if self._row(name) is not None:
            raise AlreadyExistsError(f"snapshot {name!r} already exists")
        now = time.time_ns()
        parent_id = parent_row.id if parent_row else None
        size, inodes = (usage.size, usage.inodes) if usage is not None else (0, 0)
        cursor = self._db.execute(
            "INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns, size, inodes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, parent_id, int(kind), now, now, size, inodes),
        )
        snapshot_id = cursor.lastrowid
        assert snapshot_id is not None
        self._set_labels(snapshot_id, labels)
        return Snapshot(str(snapshot_id), kind, self._parent_ids(parent_id))

    def commit_active(
        self, key: str, name: str, usage: Usage, labels: Mapping[str, str], expect_id: str
    ) -> None:
        """Rename active `key` to committed `name`; labels are replaced, not inherited."""
        row = self._require(key)
        if not name:
            raise InvalidArgumentError("committed snapshot name must not be empty")
        if self._row(name) is not None:
            raise AlreadyExistsError(f"snapshot {name!r} already exists")
        if row.kind != Kind.ACTIVE:
            raise FailedPreconditionError(f"snapshot {key!r} is not active")
        if str(row.id) != expect_id:
            raise FailedPreconditionError(f"snapshot {key!r} was replaced during the commit")
        now = time.time_ns()
        self._db.execute(
            "UPDATE snapshots SET name = ?, kind = ?, created_ns = ?, updated_ns = ?,"
            " size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, row.id),
        )
        self._set_labels(row.id, labels)

    def remove(self, name: str) -> tuple[str, Kind]:
        """Forget a snapshot without children; returns its id and kind."""
        row = self._require(name)
        child = self._db.execute(
            "SELECT name FROM snapshots WHERE parent_id = ? LIMIT 1", (row.id,)
        ).fetchone()
        if child is not None:
            raise FailedPreconditionError(
                f"cannot remove snapshot {name!r}: snapshot {child[0]!r} is its child"
            )
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
        return str(row.id), Kind(row.kind)

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Info:
        """Change labels: all of them (no paths, or "labels") or one ("labels.<key>")."""
        row = self._require(name)
        current = self._labels(row.id)
        if not paths:
            current = dict(labels)
        for path in paths:
            if path.startswith("labels."):
                key = path.removeprefix("labels.")
                current[key] = labels.get(key, "")
            elif path == "labels":
                current = dict(labels)
            else:
                raise InvalidArgumentError(f"cannot update field {path!r} of snapshot {name!r}")
        self._db.execute(
            "UPDATE snapshots SET updated_ns = ? WHERE id = ?", (time.time_ns(), row.id)
        )
        self._set_labels(row.id, current)
        return self._info(self._row_by_id(row.id))
