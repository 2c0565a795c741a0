"""Where the snapshotter keeps things under its root directory.

<root>/                      mode 0700
  metadata.db (+ -wal, -shm) SQLite: every snapshot's name, kind, parent, labels, usage
  snapshots/                 mode 0700
    <id>/fs                  the snapshot's files (overlay upperdir, or the bind source); for
                             a remote snapshot the apull layer's EROFS is mounted here
    <id>/work                overlay workdir (active snapshots only)
    new-*                    a Prepare/View in progress (renamed to <id> before commit)
    rm-*                     orphans Cleanup is deleting
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEMP_PREFIX = "new-"
REMOVING_PREFIX = "rm-"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def metadata_db(self) -> Path:
        return self.root / "metadata.db"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id

    def fs_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id / "fs"

    def work_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id / "work"
