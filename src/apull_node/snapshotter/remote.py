"""Remote snapshots: apull layers mounted from apulld instead of unpacked by containerd.

containerd (with CRI's snapshot annotations) prepares each layer with the layer's annotations
as labels. For an apull layer with a target (`containerd.io/snapshot.ref`) the Prepare hook:

1. works out the blob (remote_layer: digest, size, chunk table) and its registry/repository
   (from CRI's image-ref label);
2. creates the active snapshot `key` and commits it as the target, with the request's
   labels and BLOB_ID_LABEL, and answers AlreadyExists: containerd finds the committed
   target and downloads nothing;
3. meanwhile, in the background: at the first layer of an image, asks apulld to warm all
   its layers at once (PUT prefetch with CRI's manifest-digest label: chunk tables and
   first chunks fetched ahead); registers the blob (PUT blob_config, whose answer names the
   backend that serves it) and mounts the EROFS layer read-only on its `fs` (fscache:
   `none` with fsid=<blob_id>; file: the blob's file from apulld's answer). So an image's
   layers are registered and mounted while containerd goes on to the next ones, instead
   of one after the other. The image's top layer waits for all of them: a layer that
   cannot be registered or mounted (apulld down, a bad chunk table) fails the pull there,
   with the reason; anything that stacks on a layer (Prepare, View, Mounts) or removes it
   waits for its mount.

The mount is the snapshot: containers stack overlayfs on it like on any parent. At start
`restore` registers every committed remote snapshot again and mounts those that are not
mounted (after a reboot or crash), and forgets blobs no snapshot uses any more; removing one
unmounts it (OverlaySnapshotter deletes nothing mounted) and `removed` forgets the blob in
apulld unless another snapshot uses it (a blob still open, under a live overlay, stays
registered until the next start).
Usage of a remote snapshot is its blob size: measuring the mount would fetch it all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from apull_node.service.mount_syscalls import (
    MS_BIND,
    MS_RDONLY,
    MountEntry,
    MountError,
    mount,
    mount_at,
    read_mountinfo,
)
from apull_node.snapshotter import snapshotter_metrics as metrics
from apull_node.snapshotter.apulld_client import ApulldClient, ApulldError, ApulldUnreachableError
from apull_node.snapshotter.content_reader import ContentReader
from apull_node.snapshotter.diskusage import Usage
from apull_node.snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    SnapshotError,
)
from apull_node.snapshotter.overlay import OverlaySnapshotter, PrepareRequest
from apull_node.snapshotter.read_ahead import set_read_ahead
from apull_node.snapshotter.remote_layer import (
    BLOB_ID_LABEL,
    CRI_IMAGE_LAYERS_LABEL,
    CRI_MANIFEST_DIGEST_LABEL,
    RemoteLayer,
    is_apull_layer,
    remote_layer,
)
from apull_node.snapshotter.store import Info, Kind

log = logging.getLogger("apull-snapshotter.remote")

#: apulld backends that serve layer data (ping's "backend").
FSCACHE, FILE = "fscache", "file"
#: Seconds per apulld call while starting (it answers from memory; a hung one is skipped).
STARTUP_TIMEOUT = 5.0
#: Remote layers mounted at once in the background (their mounts mostly wait for apulld).
MOUNT_WORKERS = 4
#: An image's warm-up is asked for once in this many seconds (at its first layer's Prepare).
PREFETCH_AGAIN_SECONDS = 60.0


@dataclass(frozen=True)
class MountSource:
    """How to mount one registered blob.

    One blob can be a layer of several snapshots: images that share a layer above different
    parents (a common top layer) have one snapshot each for it. EROFS over fscache mounts a
    blob's fsid once (a second mount of the same fsid fails with EBUSY), so a blob mounted
    already is bind-mounted from there (for both backends: one superblock, one page cache).
    The kernel keeps the superblock while any of its mounts is left, so the snapshots can be
    removed in any order."""

    backend: str
    blob_id: str
    path: str = ""  # the file backend's blob file

    def mounted(self, entries: list[MountEntry]) -> MountEntry | None:
        """An EROFS mount of this blob already in the mount table, if any."""
        for entry in entries:
            if entry.fstype != "erofs":
                continue
            if self.backend == FSCACHE and f"fsid={self.blob_id}" in entry.options.split(","):
                return entry
            if self.backend == FILE and entry.source == self.path:
                return entry
        return None

    def mount(self, target: Path) -> None:
        shared = self.mounted(read_mountinfo())
        if shared is not None and shared.mountpoint != os.path.realpath(target):
            mount(shared.mountpoint, str(target), "", MS_BIND)
        elif self.backend == FSCACHE:
            mount("none", str(target), "erofs", MS_RDONLY, f"fsid={self.blob_id}")
        else:
            mount(self.path, str(target), "erofs", MS_RDONLY)


class RemoteSnapshots:
    """The Prepare and Remove hooks and the start-up restore, talking to one apulld."""

    def __init__(
        self, apulld: ApulldClient, content: ContentReader | None = None, read_ahead_kb: int = 0
    ) -> None:
        self.apulld = apulld
        self.content = content  # containerd's content store: the manifest for warm-ups
        self.read_ahead_kb = read_ahead_kb  # of each layer's mount; 0: the kernel's
        # One lock per blob: registering, mounting and forgetting a blob never interleave.
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._prefetched: dict[str, float] = {}  # manifest digest -> when asked
        # Mounts of just committed remote snapshots, under way: snapshot id -> its mount.
        self._pending: dict[str, Future[None]] = {}
        self._mounter = ThreadPoolExecutor(MOUNT_WORKERS, thread_name_prefix="remote-mount")

    def _lock(self, blob_id: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(blob_id, threading.RLock())

    # -- Prepare

    def prepare(self, snapshotter: OverlaySnapshotter, request: PrepareRequest) -> None:
        """PrepareHook: provide an apull layer as a committed remote snapshot.

        containerd prepares an image's layers one after the other; each waits for the one
        before. So the layer is committed here and registered and mounted in the background
        while containerd goes on to the next layer (the mounts overlap, and with apulld's
        warm-up most find their first chunk cached). The image's last layer (CRI's
        image-layers label names only it), or a Prepare without that label, waits for the
        mounts of the whole chain: a layer that cannot be mounted fails the pull there.
        """
        if not is_apull_layer(request.labels) or not request.target:
            return
        layer = remote_layer(request.labels, self.apulld.address)
        snapshot_id = None
        with self._lock(layer.blob_id), contextlib.suppress(AlreadyExistsError):
            snapshot_id = self._commit(snapshotter, request, layer)
        if snapshot_id is None:
            # Another namespace pulled it: make sure it is mounted, then it is there.
            self.parents_ready(snapshotter, _chain(snapshotter, request.target))
            raise AlreadyExistsError(f"target snapshot {request.target!r} already exists")
        if _last_layer(request.labels, layer):
            try:
                self.parents_ready(snapshotter, _chain(snapshotter, request.target))
            except FailedPreconditionError:
                if mount_at(str(snapshotter.layout.fs_dir(snapshot_id))) is None:
                    _discard(snapshotter, request.target)  # ours, never handed out
                raise
        raise AlreadyExistsError(
            f"target snapshot {request.target!r}: mounted remotely ({layer.describe()})"
        )

    def _commit(
        self, snapshotter: OverlaySnapshotter, request: PrepareRequest, layer: RemoteLayer
    ) -> str:
        """Record the target as committed (containerd's active `key` is never needed: nothing
        is unpacked), start registering and mounting it; the snapshot id. AlreadyExists
        when the target is there (another namespace pulled it)."""
        started = time.monotonic()
        labels = {**request.labels, BLOB_ID_LABEL: layer.blob_id}
        snapshot_id = snapshotter.create_committed(
            request.target, request.parent, labels, Usage(size=layer.size)
        )
        self._mounter.submit(self.prefetch, request.labels, layer)
        future = self._mounter.submit(
            self._mount_committed, snapshotter, snapshot_id, request.target, layer, started
        )
        with self._guard:
            self._pending[snapshot_id] = future
        future.add_done_callback(lambda _: self._settled(snapshot_id))
        return snapshot_id

    def _mount_committed(
        self, snapshotter: OverlaySnapshotter, snapshot_id: str, name: str,
        layer: RemoteLayer, started: float,
    ) -> None:  # fmt: skip
        """The background registration and mount of a remote snapshot just committed; a
        failure is logged (the chain's top layer, or the first use, tries again and fails
        with the reason)."""
        fs = snapshotter.layout.fs_dir(snapshot_id)
        with self._lock(layer.blob_id):
            if not fs.is_dir() or mount_at(str(fs)) is not None:
                return  # removed, or mounted by a user that did not wait
            try:
                source = self.register(layer)
                self._mount(source, fs, layer)
            except SnapshotError as err:
                log.error("remote snapshot %s not mounted: %s", name, err)
                return
        log.info(
            "remote snapshot %s: %s mounted on %s (%s backend, %.0f ms after its Prepare)",
            name, layer.describe(), fs, source.backend, (time.monotonic() - started) * 1000,
        )  # fmt: skip

    def _settled(self, snapshot_id: str) -> None:
        with self._guard:
            self._pending.pop(snapshot_id, None)

    def wait_for_mount(self, snapshot_id: str) -> None:
        """Until the background mount of that snapshot, if one is under way, is over."""
        with self._guard:
            future = self._pending.get(snapshot_id)
        if future is not None:
            future.result()

    def removing(self, snapshotter: OverlaySnapshotter, snapshot_id: str) -> None:
        """RemovingHook: a mount under way finishes before the snapshot's directory goes."""
        self.wait_for_mount(snapshot_id)

    def close(self) -> None:
        """Let the mounts under way finish."""
        self._mounter.shutdown(wait=True)

    def prefetch(self, labels: Mapping[str, str], layer: RemoteLayer) -> None:
        """Ask apulld to warm the image's layers, once per image and minute, with the
        manifest from containerd's content store when it can be read; best effort (without
        CRI's manifest label, or when apulld refuses, each mount fetches its own)."""
        manifest = labels.get(CRI_MANIFEST_DIGEST_LABEL, "")
        if not manifest:
            return
        now = time.monotonic()
        with self._guard:
            for digest in [d for d, at in self._prefetched.items()
                           if at + PREFETCH_AGAIN_SECONDS < now]:  # fmt: skip
                del self._prefetched[digest]
            if manifest in self._prefetched:
                return
            self._prefetched[manifest] = now
        data = self.content.read(manifest) if self.content is not None else None
        try:
            self.apulld.prefetch(layer.registry, layer.repo, manifest, data)
        except ApulldError as err:
            log.warning("image %s/%s@%s not warmed: %s", layer.registry, layer.repo, manifest, err)

    def register(self, layer: RemoteLayer) -> MountSource:
        """Tell apulld about the blob; how to mount it. FailedPrecondition says what to do."""
        try:
            answer = self.apulld.put_blob(layer.blob_config())
            # An older apulld names no backend in its answer: ask it.
            backend = answer.get("backend") or self.apulld.ping().get("backend", "")
            if backend not in (FSCACHE, FILE):
                self._refuse_unserved(layer, backend)
        except ApulldUnreachableError as err:
            raise FailedPreconditionError(
                f"{layer.describe()} cannot be mounted: {err}. Is apulld running "
                f"(systemctl status apulld)? The snapshotter looks for it at "
                f"{self.apulld.address} ([snapshotter] apulld_address)"
            ) from err
        except ApulldError as err:
            raise FailedPreconditionError(
                f"{layer.describe()}: apulld refused the blob: {err}"
            ) from err
        path = answer.get("path", "")
        if backend == FILE and not (isinstance(path, str) and path):
            raise FailedPreconditionError(
                f"{layer.describe()}: apulld at {self.apulld.address} (file backend) "
                "answered without the blob's file path"
            )
        return MountSource(backend, layer.blob_id, path if backend == FILE else "")

    def _refuse_unserved(self, layer: RemoteLayer, backend: str) -> None:
        """apulld took the blob but serves no layer data: forget the blob again, say why."""
        ping = self.apulld.ping()
        self.apulld.delete_blob(layer.blob_id)
        reasons = "; ".join(str(r) for r in ping.get("reasons", [])) or "none given"
        raise FailedPreconditionError(
            f"{layer.describe()}: apulld at {self.apulld.address} serves no layer data "
            f"(backend {backend!r}; reasons: {reasons}). Fix the node (kernel with "
            "EROFS over fscache or file-backed EROFS) and restart apulld"
        )

    def _mount(self, source: MountSource, fs: Path, layer: RemoteLayer) -> None:
        started = time.monotonic()
        try:
            source.mount(fs)
        except MountError as err:
            elapsed = time.monotonic() - started
            metrics.MOUNT_SECONDS.labels(source.backend, "error").observe(elapsed)
            hint = (
                "the kernel needs EROFS with CONFIG_EROFS_FS_BACKED_BY_FILE (Linux >= 6.12)"
                if source.backend == FILE
                else "the kernel needs EROFS over fscache on demand (CONFIG_EROFS_FS_ONDEMAND)"
            )
            raise FailedPreconditionError(
                f"{layer.describe()}: cannot mount it on {fs}: {err} ({hint}; see apulld's log)"
            ) from err
        if self.read_ahead_kb:
            set_read_ahead(fs, self.read_ahead_kb)
        metrics.MOUNT_SECONDS.labels(source.backend, "ok").observe(time.monotonic() - started)

    # -- mounts handed out on top of remote layers

    def parents_ready(
        self, snapshotter: OverlaySnapshotter, parents: list[tuple[str, Info]]
    ) -> None:
        """ParentsHook: mount again a remote layer found unmounted (its restore at start
        failed, or someone unmounted it), or fail: never an empty lower layer."""
        entries = None
        for snapshot_id, info in parents:
            blob_id = info.labels.get(BLOB_ID_LABEL, "")
            if not blob_id or info.kind != Kind.COMMITTED:
                continue
            self.wait_for_mount(snapshot_id)  # outside the blob's lock: the mount takes it
            fs = snapshotter.layout.fs_dir(snapshot_id)
            if entries is None:
                entries = read_mountinfo()
            if mount_at(str(fs), entries) is not None:
                continue
            with self._lock(blob_id):
                if mount_at(str(fs)) is not None:
                    continue  # mounted meanwhile
                try:
                    layer = remote_layer(info.labels, self.apulld.address)
                    self._mount(self.register(layer), fs, layer)
                except SnapshotError as err:
                    raise FailedPreconditionError(
                        f"remote snapshot {info.name} (an image layer) is not mounted and "
                        f"cannot be mounted again: {err}. Once that is fixed, the next use "
                        "mounts it; or remove the image and pull it again"
                    ) from err
                log.warning("remote snapshot %s was not mounted: %s mounted again on %s",
                            info.name, layer.describe(), fs)  # fmt: skip

    # -- Remove

    def removed(self, snapshotter: OverlaySnapshotter, snapshot_id: str, info: Info) -> None:
        """RemoveHook: forget the blob in apulld once no snapshot uses it (best effort)."""
        blob_id = info.labels.get(BLOB_ID_LABEL, "")
        if not blob_id:
            return
        with self._lock(blob_id):
            with snapshotter.store.transaction() as tx:
                users = tx.labelled(BLOB_ID_LABEL, blob_id)
            if users:
                names = ", ".join(i.name for _, i in users)
                log.info("removed %s; blob %s still used by %s", info.name, blob_id, names)
                return
            try:
                known = self.apulld.delete_blob(blob_id)
            except ApulldError as err:
                log.warning("removed %s; apulld keeps blob %s: %s", info.name, blob_id, err)
                return
            log.info("removed %s; blob %s %s", info.name, blob_id,
                     "unregistered" if known else "was not registered")  # fmt: skip

    # -- start-up

    def restore(self, snapshotter: OverlaySnapshotter) -> tuple[int, int]:
        """Register every committed remote snapshot again and mount the unmounted ones.

        Failures are logged and leave the snapshot unmounted (the next Prepare or Mounts
        on it tries again, or containerd removes it); once apulld does not answer, the rest
        are not tried. Runs before serving, with a short apulld timeout so that a hung apulld
        delays the start by seconds, not minutes. Returns (mounted, failed).
        """
        serving = self.apulld
        self.apulld = ApulldClient(serving.address, min(serving.timeout, STARTUP_TIMEOUT))
        try:
            return self._restore(snapshotter)
        finally:
            self.apulld = serving

    def _restore(self, snapshotter: OverlaySnapshotter) -> tuple[int, int]:
        with snapshotter.store.transaction() as tx:
            remote = tx.labelled(BLOB_ID_LABEL)
        entries = read_mountinfo()
        mounted = failed = 0
        unreachable: str = ""
        for snapshot_id, info in remote:
            fs = snapshotter.layout.fs_dir(snapshot_id)
            if info.kind != Kind.COMMITTED:
                continue  # a Prepare cut short; containerd removes it
            is_mounted = mount_at(str(fs), entries) is not None
            if unreachable:
                if not is_mounted:
                    failed += 1
                    log.error("remote snapshot %s not mounted: %s", info.name, unreachable)
                continue
            try:
                layer = remote_layer(info.labels, self.apulld.address)
                source = self.register(layer)
                if not is_mounted:
                    self._mount(source, fs, layer)
                    mounted += 1
                    log.info("remote snapshot %s: %s mounted again on %s",
                             info.name, layer.describe(), fs)  # fmt: skip
            except SnapshotError as err:
                if isinstance(err.__cause__, ApulldUnreachableError):
                    unreachable = str(err.__cause__)
                if not is_mounted:
                    failed += 1
                    log.error("remote snapshot %s not mounted: %s", info.name, err)
                else:
                    log.warning("remote snapshot %s (mounted) not registered: %s", info.name, err)
        if not unreachable:
            self._forget_unused(snapshotter)
        committed = sum(1 for _, info in remote if info.kind == Kind.COMMITTED)
        if committed:
            log.info("remote snapshots: %d committed, %d mounted again, %d failed",
                     committed, mounted, failed)  # fmt: skip
        return mounted, failed

    def _forget_unused(self, snapshotter: OverlaySnapshotter) -> None:
        """Blobs apulld still has but no snapshot uses (a Remove that found the blob busy)."""
        try:
            registered = self.apulld.blob_ids()
        except ApulldUnreachableError as err:
            log.info("unused blobs not looked for (next start): %s", err)
            return
        except ApulldError as err:
            log.warning("cannot list apulld's blobs: %s", err)
            return
        with snapshotter.store.transaction() as tx:
            used = {info.labels[BLOB_ID_LABEL] for _, info in tx.labelled(BLOB_ID_LABEL)}
        for blob_id in sorted(set(registered) - used):
            try:
                self.apulld.delete_blob(blob_id)
            except ApulldError as err:
                log.warning("blob %s used by no snapshot, still registered: %s", blob_id, err)
            else:
                log.info("blob %s used by no snapshot: unregistered", blob_id)


def _chain(snapshotter: OverlaySnapshotter, name: str) -> list[tuple[str, Info]]:
    with snapshotter.store.transaction() as tx:
        return tx.chain(name)


def _last_layer(labels: Mapping[str, str], layer: RemoteLayer) -> bool:
    """Whether this is the image's top layer by CRI's image-layers label (this layer and the
    ones above it; truncated by containerd only when long); True without the label."""
    layers = labels.get(CRI_IMAGE_LAYERS_LABEL, "")
    return not layers or layers.split(",") == [layer.digest]


def _discard(snapshotter: OverlaySnapshotter, key: str) -> None:
    """Remove a remote snapshot we made and never handed out (unmounted first); a failure
    is only logged."""
    try:
        snapshotter.remove(key)
    except Exception as err:
        log.warning("cannot remove the unfinished remote snapshot %s: %s", key, err)
