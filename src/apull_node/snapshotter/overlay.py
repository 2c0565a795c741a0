"""The snapshotter proper: containerd's overlay snapshotter semantics on our metadata store.

Directories and metadata stay consistent across crashes: a new snapshot's directory is built
under a temporary name, renamed to `snapshots/<id>` (and the rename made durable) before its
record commits; removals commit the record first and delete the directory after. Whatever a
crash leaves behind is a directory without a record, which Cleanup (and start-up, for
temporary names) deletes.

A directory may have a filesystem mounted in it (a remote snapshot's EROFS layer on its
`fs`): every deletion unmounts what is mounted below the directory first (detaching it when
busy), and leaves the directory alone when that fails, so nothing ever walks into a mount.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from apull_node.service.mount_syscalls import MountError, mountpoints_under, unmount_or_detach
from apull_node.snapshotter.diskusage import Usage, disk_usage
from apull_node.snapshotter.errors import NotFoundError, StepError
from apull_node.snapshotter.filters import Adaptor, Filter, parse_filters
from apull_node.snapshotter.layout import REMOVING_PREFIX, TEMP_PREFIX, Layout
from apull_node.snapshotter.mounts import Mount, overlay_options, snapshot_mounts
from apull_node.snapshotter.store import Info, Kind, MetaStore, Snapshot, validate_labels

log = logging.getLogger("apull-snapshotter.overlay")

#: Set by containerd's unpacker on Prepare: the name the layer will be committed as.
SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"


@dataclass(frozen=True)
class PrepareRequest:
    key: str
    parent: str
    labels: Mapping[str, str]

    @property
    def target(self) -> str:
        """The committed name unpack wants (label containerd.io/snapshot.ref), or ""."""
        return self.labels.get(SNAPSHOT_REF_LABEL, "")


class PrepareHook(Protocol):
    """Looks at a Prepare before the snapshotter creates an ordinary active snapshot.

    A hook that can provide the layer itself (a remote snapshot served by apulld) creates
    `request.key` and commits it as `request.target`, keeping the request's labels, through
    the snapshotter's `create`/`commit`, then raises AlreadyExistsError: containerd looks the
    target up (List, by label containerd.io/snapshot.ref and parent) and skips downloading
    that layer. Returning None lets the next hook, and finally the ordinary Prepare, run.
    """

    def __call__(self, snapshotter: OverlaySnapshotter, request: PrepareRequest) -> None: ...


class ParentsHook(Protocol):
    """Called before mounts on top of committed snapshots are handed out (Prepare, View,
    Mounts) with those snapshots, nearest first (id, Info): a remote layer that is not
    mounted is mounted again here, or the call fails, instead of an empty lower layer."""

    def __call__(
        self, snapshotter: OverlaySnapshotter, parents: list[tuple[str, Info]]
    ) -> None: ...


class RemovingHook(Protocol):
    """Told the id of a snapshot about to be removed, before its record and directory go
    (a remote layer's mount still under way finishes first)."""

    def __call__(self, snapshotter: OverlaySnapshotter, snapshot_id: str) -> None: ...


class RemoveHook(Protocol):
    """Told about each removed snapshot after its record and its directory are gone."""

    def __call__(self, snapshotter: OverlaySnapshotter, snapshot_id: str, info: Info) -> None: ...


def _adaptor(info: Info) -> Adaptor:
    """The fields containerd's filters can name on a snapshot."""
    return lambda fieldpath: _info_field(info, fieldpath)


def _info_field(info: Info, fieldpath: Sequence[str]) -> tuple[str, bool]:
    if not fieldpath:
        return "", False
    name = fieldpath[0]
    if name == "kind":
        return info.kind.name.lower(), info.kind != Kind.UNKNOWN
    if name == "name":
        return info.name, True
    if name == "parent":
        return info.parent, True
    if name == "labels":
        key = ".".join(fieldpath[1:])
        return info.labels.get(key, ""), key in info.labels
    return "", False


@contextlib.contextmanager
def _step(what: str, path: Path | None) -> Iterator[None]:
    """Name the step (and its path) when an OSError escapes it."""
    try:
        yield
    except OSError as err:
        raise StepError(f"{what} {path}: {err.strerror or err}") from err


class OverlaySnapshotter:
    """containerd's Snapshots API over overlayfs, with hooks for remote (apull) layers.

    Every method either completes or leaves the store and the directories as they were: a
    snapshot's record and its directory are created together and removed together (what a
    crash leaves between the two is freed by the next `cleanup`). Errors are the classes of
    `errors` (one per gRPC status); a failed step on the file system is a StepError naming
    the step and the path.
    """

    def __init__(
        self,
        root: Path,
        prepare_hooks: Iterable[PrepareHook] = (),
        remove_hooks: Iterable[RemoveHook] = (),
        parents_hooks: Iterable[ParentsHook] = (),
        removing_hooks: Iterable[RemovingHook] = (),
    ) -> None:
        self.layout = Layout(root)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self.layout.snapshots.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.layout.snapshots, 0o700)
        self.store = MetaStore(self.layout.metadata_db)
        os.chmod(self.layout.metadata_db, 0o600)
        self.prepare_hooks = list(prepare_hooks)
        self.remove_hooks = list(remove_hooks)
        self.parents_hooks = list(parents_hooks)
        self.removing_hooks = list(removing_hooks)
        self._overlay_options = overlay_options()
        self._reap_temporaries()

    def close(self) -> None:
        """Close the metadata store; nothing else may be called after."""
        self.store.close()

    # -- creating

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """A new active (writable) snapshot `key` on `parent`, and its mounts; the prepare
        hooks run first and may answer instead (see PrepareHook). AlreadyExists when `key`
        is taken, NotFound when `parent` is missing, FailedPrecondition when it is not
        committed."""
        validate_labels(labels)
        request = PrepareRequest(key, parent, dict(labels))
        for hook in self.prepare_hooks:
            hook(self, request)
        self._parents_ready(parent)
        return self.create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """A read-only view of `parent` named `key`: its mounts (a bind mount of a single
        layer, else a read-only overlay). AlreadyExists when `key` is taken, NotFound when
        `parent` is missing."""
        validate_labels(labels)
        self._parents_ready(parent)
        return self.create(Kind.VIEW, key, parent, labels)

    def _parents_ready(self, parent: str) -> None:
        """Run the parents hooks on `parent` and its ancestors (nothing without a parent)."""
        if not parent or not self.parents_hooks:
            return
        with self.store.transaction() as tx:
            try:
                chain = tx.chain(parent)
            except NotFoundError:
                return  # create() reports it
        for hook in self.parents_hooks:
            hook(self, chain)

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Record the snapshot and build its directory, both or neither."""
        snapshot = self._build(kind, key, parent, labels, None)
        return snapshot_mounts(self.layout, snapshot, self._overlay_options)

    def create_committed(
        self, name: str, parent: str, labels: Mapping[str, str], usage: Usage
    ) -> str:
        """A committed snapshot with an empty `fs` directory, in one step (a remote layer,
        mounted there afterwards; nothing is unpacked into it); its id. AlreadyExists when
        `name` is taken."""
        validate_labels(labels)
        return self._build(Kind.COMMITTED, name, parent, labels, usage).id

    def _build(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str], usage: Usage | None
    ) -> Snapshot:
        temp: Path | None = None
        final: Path | None = None
        try:
            with self.store.transaction() as tx:
                # Inside the transaction: Cleanup, which holds it too, never sees this name.
                with _step("creating a snapshot directory in", self.layout.snapshots):
                    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.layout.snapshots))
                # chmod as well: the modes must not depend on the service's umask.
                with _step("creating", temp / "fs"):
                    (temp / "fs").mkdir()
                    os.chmod(temp / "fs", 0o755)
                if kind == Kind.ACTIVE:
                    with _step("creating", temp / "work"):
                        (temp / "work").mkdir()
                        os.chmod(temp / "work", 0o711)
                snapshot = tx.create(kind, key, parent, labels, usage)
                if snapshot.parent_ids:
                    # The new upper layer starts owned like the parent's root directory.
                    parent_fs = self.layout.fs_dir(snapshot.parent_ids[0])
                    with _step("giving the new layer the owner of", parent_fs):
                        st = os.stat(parent_fs)
                        os.lchown(temp / "fs", st.st_uid, st.st_gid)
                final = self.layout.snapshot_dir(snapshot.id)
                if os.path.lexists(final):
                    # Left by a crash before its record committed: the id was never used.
                    log.warning("removing stale snapshot directory %s", final)
                    self._delete_tree(final)
                with _step("moving the new snapshot into place at", final):
                    os.rename(temp, final)
                temp = None
                _fsync_dir(self.layout.snapshots)
        except BaseException:
            for leftover in (temp, final):
                if leftover is not None:
                    self._delete_tree(leftover)
            raise
        return snapshot

    # -- reading

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of active or view snapshot `key` again (NotFound when absent)."""
        with self.store.transaction() as tx:
            snapshot = tx.snapshot(key)
            parent = tx.info(key)[1].parent
        self._parents_ready(parent)
        return snapshot_mounts(self.layout, snapshot, self._overlay_options)

    def fs_dir(self, key: str) -> Path:
        """The snapshot's `fs` directory (upperdir, bind source, or a remote layer's mount)."""
        with self.store.transaction() as tx:
            return self.layout.fs_dir(tx.info(key)[0])

    def stat(self, key: str) -> Info:
        """The snapshot's record (NotFound when absent)."""
        with self.store.transaction() as tx:
            return tx.info(key)[1]

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        """Every snapshot matching all `filters` (containerd's filter syntax; InvalidArgument
        for a bad one)."""
        selected: Filter = parse_filters(filters)
        with self.store.transaction() as tx:
            infos = tx.infos()
        return [info for info in infos if selected.matches(_adaptor(info))]

    def usage(self, key: str) -> Usage:
        """Measured for active snapshots (may take a while), recorded at commit otherwise."""
        with self.store.transaction() as tx:
            snapshot_id, info, usage = tx.info(key)
        if info.kind == Kind.ACTIVE:
            return disk_usage(self.layout.fs_dir(snapshot_id))
        return usage

    # -- changing

    def commit(
        self, name: str, key: str, labels: Mapping[str, str], usage: Usage | None = None
    ) -> None:
        """Commit active `key` as `name`; its usage is measured unless given (remote layers)."""
        validate_labels(labels)
        with self.store.transaction() as tx:
            snapshot_id, info, _ = tx.info(key)
        if usage is None:
            # Measured outside the transaction: other snapshots need not wait for the walk.
            active = info.kind == Kind.ACTIVE
            usage = disk_usage(self.layout.fs_dir(snapshot_id)) if active else Usage()
        with self.store.transaction() as tx:
            tx.commit_active(key, name, usage, labels, expect_id=snapshot_id)

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Info:
        """Replace the labels named in `paths` ("labels.KEY"; all labels when empty); the
        updated record. NotFound when absent, InvalidArgument for another field."""
        validate_labels(labels)
        with self.store.transaction() as tx:
            return tx.update(name, labels, paths)

    def remove(self, key: str) -> None:
        """Remove snapshot `key`, its record at once and its directory after (a directory
        that cannot go is left for `cleanup`). NotFound when absent, FailedPrecondition when
        it has children."""
        if self.removing_hooks:
            with self.store.transaction() as tx:
                snapshot_id = tx.info(key)[0]
            for removing in self.removing_hooks:
                removing(self, snapshot_id)
        with self.store.transaction() as tx:
            info = tx.info(key)[1]
            snapshot_id, _ = tx.remove(key)
        self._delete_tree(self.layout.snapshot_dir(snapshot_id))
        for hook in self.remove_hooks:
            hook(self, snapshot_id, info)

    def cleanup(self) -> list[Path]:
        """Delete every directory under snapshots/ without a record; return what went."""
        doomed = []
        with self.store.transaction() as tx:
            ids = tx.ids()
            for entry in sorted(os.listdir(self.layout.snapshots)):
                if entry in ids:
                    continue
                path = self.layout.snapshots / entry
                if not entry.startswith(REMOVING_PREFIX):
                    # Renamed while no Prepare can run, so a new snapshot never gets an id
                    # whose stale directory we are still deleting.
                    renamed = path.with_name(f"{REMOVING_PREFIX}{entry}-{uuid.uuid4().hex[:8]}")
                    os.rename(path, renamed)
                    path = renamed
                doomed.append(path)
        for path in doomed:
            self._delete_tree(path)
        return doomed

    # -- housekeeping

    def _reap_temporaries(self) -> None:
        """Unfinished creations and removals from a previous run (nothing runs yet)."""
        for entry in os.listdir(self.layout.snapshots):
            if entry.startswith((TEMP_PREFIX, REMOVING_PREFIX)):
                log.info("removing leftover %s", self.layout.snapshots / entry)
                self._delete_tree(self.layout.snapshots / entry)

    @staticmethod
    def _delete_tree(path: Path) -> None:
        """Best effort: a failure is logged and the orphan left for the next Cleanup.

        Whatever is mounted below `path` is unmounted first; if that fails, the tree stays.
        """
        if not _unmount_under(path):
            return
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("cannot remove %s: %s", path, err)


def _unmount_under(path: Path) -> bool:
    """Unmount (or detach, when busy) every mount at or below `path`; False if one stays."""
    for _ in range(8):  # mounts may be stacked on one mountpoint
        points = mountpoints_under(str(path))
        if not points:
            return True
        for point in points:
            try:
                detached = unmount_or_detach(point)
            except MountError as err:
                log.warning("cannot unmount %s, leaving %s: %s", point, path, err)
                return False
            log.info("%s %s", "detached busy mount" if detached else "unmounted", point)
    log.warning("mounts keep appearing under %s; leaving it", path)
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
