"""The file backend: each configured blob is a read-only file in apulld's FUSE directory, its
bytes fetched on demand through the chunk cache; the snapshotter mounts EROFS from it
(``mount -t erofs -o ro <mountpoint>/<blob_id> <dir>``, Linux >= 6.12).

FUSE layout: one flat directory (node 1) of regular files, mode 0444, owner root, mtime 0,
named by blob_id, sized like the blob. A file's node id is derived from its blob_id and
digest, so the same blob keeps its node id across apulld restarts (what resuming a FUSE
connection needs) and a blob replaced by other content gets a new one.

Restarts: the FUSE connection lives as long as some process holds its /dev/fuse fd. apulld
hands a copy to systemd's fd store (FileDescriptorStoreMax=) and takes it back at the next
start: mounted EROFS images keep working across a restart, and reads the old process had
taken but not answered are sent again (FUSE_NOTIFY_RESEND). Without a store (not run by
systemd, or the store was flushed by `systemctl stop`) the connection dies with apulld:
EROFS mounts from its files fail with EIO/ENOTCONN on anything not in the page cache and
must be remounted; apulld logs which ones.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import threading
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from apull_node.daemon import apulld_metrics as metrics
from apull_node.daemon import fdstore
from apull_node.daemon import fuse_mount as fm
from apull_node.daemon import fuse_protocol as fp
from apull_node.daemon.blob_registry import BlobConfig, BlobRegistry
from apull_node.daemon.blob_source import (
    PendingTable,
    RegistrySource,
    TableError,
    TableStore,
    location_of,
)
from apull_node.daemon.chunk_cache import BlobSpec, ChunkCache, ChunkUnavailableError
from apull_node.daemon.counters import Counters
from apull_node.daemon.fuse_server import FuseError, FuseSession
from apull_node.daemon.http_api import ServingError
from apull_node.daemon.registry_fetch import FetchSettings, RangeFetcher
from apull_node.daemon.startup_reads import StartupReads
from apull_node.daemon.whole_blob import fetch_whole

log = logging.getLogger("apulld.file")
ROOT = fp.ROOT_ID
_SELF_AND_PARENT = [(ROOT, fp.DT_DIR, "."), (ROOT, fp.DT_DIR, "..")]


class FileBackendError(Exception):
    """The FUSE directory cannot be set up; the message says where and why."""


@dataclass(frozen=True)
class FileBackendConfig:
    cache_dir: Path
    mountpoint: Path
    fetch: FetchSettings
    cache_limit_bytes: int
    threads: int = 4
    #: Blobs of at most this many bytes are fetched whole at their first read, their
    #: chunk tables computed from them (whole_blob.py); 0: never.
    whole_max_bytes: int = 0


def node_id(config: BlobConfig) -> int:
    raw = hashlib.sha256(f"{config.blob_id}\0{config.digest}".encode()).digest()
    return 2 + (int.from_bytes(raw[:8], "little") >> 2)


class FileBackend:
    entry_ttl = 1.0
    attr_ttl = 3600.0

    def __init__(self, config: FileBackendConfig, blobs: BlobRegistry) -> None:
        self.config = config
        self.blobs = blobs
        self.counters = Counters()
        self.fetcher = RangeFetcher(config.fetch, self.counters)
        self.startup = StartupReads()
        self.cache = ChunkCache(
            config.cache_dir / "chunks", config.cache_limit_bytes, self.counters, prefetch=True
        )
        self.tables = TableStore(config.cache_dir / "tables", self.fetcher)
        self.mountpoint = str(config.mountpoint)
        self._lock = threading.Lock()
        self._nodes: dict[int, BlobConfig] = {}
        self._names: dict[str, int] = {}
        self._open: dict[int, int] = {}
        self._next_fh = 1
        self._fd = -1
        self._session: FuseSession | None = None
        self.resumed = False
        self.stored = False
        for blob in blobs.all():
            if blob.chunk_table:
                self._index(blob)
            else:
                log.warning("blob %s has no chunk_table: the file backend cannot serve it",
                            blob.blob_id)  # fmt: skip

    # -- life cycle -----------------------------------------------------------------------

    def start(self, inherited_fd: int | None = None) -> None:
        """Resume the inherited FUSE connection if it is still alive, else mount afresh."""
        if inherited_fd is not None and self._alive(inherited_fd):
            self._fd, self.resumed = inherited_fd, True
            log.info("resuming the FUSE connection at %s from the previous apulld", self.mountpoint)
        else:
            if inherited_fd is not None:
                log.warning("the inherited FUSE fd is dead or not mounted at %s; mounting afresh",
                            self.mountpoint)  # fmt: skip
                os.close(inherited_fd)
            self._mount()
        self._session = FuseSession(self._fd, self, threads=self.config.threads,
                                    resumed=self.resumed)  # fmt: skip
        self._session.start()
        if not self._session.initialized.wait(10):
            raise FileBackendError(f"FUSE at {self.mountpoint}: the kernel sent no INIT in 10s")
        self.stored = fdstore.store(self._fd, fdstore.FUSE_FD_NAME)
        if self.stored:
            log.info("FUSE connection handed to the service manager's fd store")

    def _alive(self, fd: int) -> bool:
        if not fm.is_fuse_device(fd):
            return False
        entry = fm.mount_at(self.mountpoint)
        if entry is None or not entry.fstype.startswith("fuse"):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return not any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0))

    def _mount(self) -> None:
        entries = fm.read_mountinfo()
        stale = fm.mount_at(self.mountpoint, entries)
        if stale is not None:
            if not stale.fstype.startswith("fuse"):
                raise FileBackendError(f"{self.mountpoint}: a {stale.fstype} is mounted there")
            self._warn_orphans(entries, "its FUSE connection is gone (apulld stopped)")
            try:
                fm.unmount(self.mountpoint)
            except fm.MountError as err:
                raise FileBackendError(str(err)) from err
        try:
            fm.ensure_mountpoint(Path(self.mountpoint))
            self._fd = fm.open_fuse_device()
            fm.mount_fuse(self._fd, self.mountpoint)
        except OSError as err:
            raise FileBackendError(f"cannot mount FUSE at {self.mountpoint}: {err}") from err
        log.info("FUSE directory of blob files mounted at %s", self.mountpoint)

    def _warn_orphans(self, entries: list[fm.MountEntry], why: str) -> None:
        users = fm.mounts_from(self.mountpoint, entries)
        if users:
            log.error(
                "%s: %s; %d mount(s) from its files can no longer read uncached data and must "
                "be remounted: %s",
                self.mountpoint, why, len(users),
                ", ".join(f"{u.mountpoint} ({u.source})" for u in users),
            )  # fmt: skip

    def stop(self) -> None:
        """Finish the requests in hand. With the fd stored, leave the mount for the next
        apulld; else unmount (lazily), since nobody can serve it any more."""
        if self._session is not None:
            self._session.stop()
        if self._fd < 0:
            return
        if self.stored:
            log.info("leaving %s mounted: the service manager keeps its FUSE connection",
                     self.mountpoint)  # fmt: skip
        else:
            self._warn_orphans(fm.read_mountinfo(), "apulld stops and nobody keeps its FUSE fd")
            try:
                fm.unmount(self.mountpoint)
            except fm.MountError as err:
                log.warning("%s", err)
        os.close(self._fd)
        self._fd = -1
        self.cache.close()
        self.tables.close()

    # -- blob config hooks (http_api.Serving) ---------------------------------------------

    def path_of(self, blob_id: str) -> str:
        return os.path.join(self.mountpoint, blob_id)

    def check_put(self, config: BlobConfig) -> None:
        if not config.chunk_table:
            raise ServingError(
                HTTPStatus.BAD_REQUEST,
                "chunk_table: required by the file backend (the layer's "
                "containerd.io/snapshot/apull.chunk-table label)",
            )
        with self._lock:
            old = self._nodes.get(self._names.get(config.blob_id, 0))
        if old is not None and node_id(old) != node_id(config):
            self._refuse_if_busy(old, "replaced")

    def added(self, config: BlobConfig) -> dict[str, Any]:
        with self._lock:
            old = self._nodes.get(self._names.get(config.blob_id, 0))
            if old is not None:
                self._unindex(old)
            self._index(config)
        if old is not None and self._session is not None:
            self._session.notify_inval_entry(ROOT, config.blob_id)
        return {"path": self.path_of(config.blob_id)}

    def check_delete(self, blob_id: str) -> None:
        with self._lock:
            config = self._nodes.get(self._names.get(blob_id, 0))
        if config is not None:
            self._refuse_if_busy(config, "removed")

    def removed(self, blob_id: str) -> None:
        with self._lock:
            config = self._nodes.get(self._names.get(blob_id, 0))
            if config is not None:
                self._unindex(config)
        if self._session is not None:
            self._session.notify_inval_entry(ROOT, blob_id)

    def _refuse_if_busy(self, config: BlobConfig, what: str) -> None:
        path = self.path_of(config.blob_id)
        users = [m.mountpoint for m in fm.read_mountinfo() if m.source == path]
        with self._lock:
            opened = self._open.get(node_id(config), 0)
        if users or opened:
            where = f"mounted at {', '.join(users)}" if users else f"open {opened} time(s)"
            raise ServingError(
                HTTPStatus.CONFLICT,
                f"blob {config.blob_id} is in use ({where}) and cannot be {what}; unmount it first",
            )

    def _index(self, config: BlobConfig) -> None:
        node = node_id(config)
        self._nodes[node] = config
        self._names[config.blob_id] = node

    def _unindex(self, config: BlobConfig) -> None:
        self._nodes.pop(node_id(config), None)
        self._names.pop(config.blob_id, None)

    # -- prewarm (image_prewarm.ChunkHolder) ----------------------------------------------

    def held(self, config: BlobConfig, chunk_size: int) -> list[bool]:
        """Which chunks the chunk cache holds."""
        return self.cache.present(config.digest, chunk_size, config.size)

    def fill(self, config: BlobConfig, spec: BlobSpec, source: RegistrySource,
             offset: int, size: int) -> int:  # fmt: skip
        """Fetch, verify and keep the missing chunks in the chunk cache (no read-ahead, not
        a read: chunks a reader is fetching are waited for, a failure is raised)."""
        return sum(len(data) for _, data in self.cache.fill(spec, source, offset, size).values())

    def describe(self) -> dict[str, Any]:
        with self._lock:
            files, opened = len(self._nodes), sum(self._open.values())
        connected = self._session is not None and not self._session.disconnected.is_set()
        return {
            "backend": "file",
            "mountpoint": self.mountpoint,
            "fuse_connected": connected,
            "resumed": self.resumed,
            "fd_stored": self.stored,
            "files": files,
            "open_files": opened,
            "cache_bytes": self.cache.used,
            "cache_limit_bytes": self.cache.limit,
            "stats": self.counters.snapshot(),
        }

    # -- the filesystem (fuse_server.Filesystem) ------------------------------------------

    def _blob(self, node: int) -> BlobConfig:
        with self._lock:
            config = self._nodes.get(node)
        if config is None:
            raise FuseError(errno.ENOENT)
        return config

    def _attr(self, node: int) -> fp.Attr:
        if node == ROOT:
            return fp.Attr(ROOT, 0, fp.S_IFDIR | 0o555, nlink=2)
        return fp.Attr(node, self._blob(node).size, fp.S_IFREG | 0o444)

    def lookup(self, parent: int, name: str) -> fp.Attr:
        with self._lock:
            node = self._names.get(name) if parent == ROOT else None
        if node is None:
            raise FuseError(errno.ENOENT)
        return self._attr(node)

    def getattr(self, nodeid: int) -> fp.Attr:
        return self._attr(nodeid)

    def open(self, nodeid: int, flags: int) -> tuple[int, int]:
        if nodeid == ROOT:
            raise FuseError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FuseError(errno.EROFS)
        self._blob(nodeid)
        with self._lock:
            self._open[nodeid] = self._open.get(nodeid, 0) + 1
            fh, self._next_fh = self._next_fh, self._next_fh + 1
        # Direct I/O: EROFS keeps its own page cache of what it reads; a second copy in the
        # FUSE file's page cache would only double the memory (and measured slower).
        return fh, fp.FOPEN_DIRECT_IO

    def release(self, nodeid: int, fh: int) -> None:
        with self._lock:
            left = self._open.get(nodeid, 0) - 1
            if left > 0:
                self._open[nodeid] = left
            else:
                self._open.pop(nodeid, None)

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> fp.Payload:
        config = self._blob(nodeid)
        self.counters.add("read_requests")
        self.startup.saw(config.digest, offset, min(size, max(0, config.size - offset)))
        try:
            source = RegistrySource(self.fetcher, location_of(config))
            if config.size <= self.config.whole_max_bytes:
                fetch_whole(self.cache, self.tables, config, source)  # unless known already
            table = self.tables.soon(config)
            spec = BlobSpec(config.digest, config.size, table)
            data = self.cache.read(spec, source, offset, size)
            if isinstance(table, PendingTable):
                table.ready()  # fetched alongside the chunks: this config must fit it
            metrics.SERVED_FILE_BYTES.inc(len(data))
            return data
        except (TableError, ChunkUnavailableError) as err:
            self.counters.add("read_errors")
            log.error("read of blob %s bytes %d-%d failed (EIO): %s",
                      config.blob_id, offset, offset + size - 1, err)  # fmt: skip
            raise FuseError(errno.EIO) from err

    def readdir(self, nodeid: int) -> list[tuple[int, int, str]]:
        if nodeid != ROOT:
            raise FuseError(errno.ENOTDIR)
        with self._lock:
            names = sorted(self._names.items())
        return _SELF_AND_PARENT + [(node, fp.DT_REG, name) for name, node in names]

    def statfs(self) -> tuple[int, int]:
        with self._lock:
            total = sum(c.size for c in self._nodes.values())
        return -(-total // 4096), len(self._nodes)
