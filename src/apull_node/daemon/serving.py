"""What apulld's two serving backends (file, fscache) share: one interface, one contract.

`main.serve` holds whichever one the node got through this interface alone, and stops it on
the way out with everything else it opened (one `contextlib.ExitStack`).

Contract, for every backend:

- A backend is started by its factory (`main.start_backend`); a factory that raises
  `BackendStartError` has left nothing behind - no mount, no thread, no fd of its own (the
  fds it inherited from the service manager's store stay there for the next start).
- `stop()` finishes the requests in hand and releases what this process holds. What must
  outlive a restart (the FUSE connection, /dev/cachefiles and the objects' fds, when the
  service manager keeps them) is left to the fd store; anything else is unmounted or closed.
  Calling it twice is harmless.
- `fetcher`, `tables`, `cache` and `counters` are the backend's registry client, chunk-table
  store, chunk cache and statistics, shared with the image warm-up and prewarm.
- `held` and `fill` (`image_prewarm.ChunkHolder`) say which chunks of a layer the backend
  holds and bring more in, for prewarm: the chunk cache (file), the kernel's cache files of
  mounted layers (fscache).
- The `http_api.Serving` hooks (`check_put`, `added`, `check_delete`, `removed`,
  `describe`) are called by the API with the blob registry's lock held.
"""

from __future__ import annotations

from typing import Protocol

from apull_node.daemon.blob_source import TableStore
from apull_node.daemon.chunk_cache import ChunkCache
from apull_node.daemon.counters import Counters
from apull_node.daemon.http_api import Serving
from apull_node.daemon.image_prewarm import ChunkHolder
from apull_node.daemon.registry_fetch import RangeFetcher
from apull_node.daemon.startup_reads import StartupReads


class BackendStartError(Exception):
    """A backend could not start; the message names the backend and the step that failed."""


class ServingBackend(Serving, ChunkHolder, Protocol):
    """A started file or fscache backend (see the module's contract)."""

    fetcher: RangeFetcher
    tables: TableStore
    cache: ChunkCache
    counters: Counters
    #: What images read when they start (the start-up sets prewarm hands on).
    startup: StartupReads

    def stop(self) -> None:
        """Finish the requests in hand and release what this process holds."""
