"""Prewarming images on request (PUT /v1.0/apulld/warm), with their progress (GET).

An operator's prewarm (`apull-containerd-grpc prewarm`, the prewarm role) pulls an image
through CRI, then asks apulld to bring its apull layers into the cache before any container
reads them:
- the start-up set first, when one is given: byte ranges per layer digest, recorded from a
  real start of the image (what it read before its first output);
- then, with ``whole``, every other chunk.

Where chunks go is the backend's business (`ChunkHolder`): the file backend's chunk cache,
or the fscache backend's kernel cache files (written through the open objects' fds, so the
layers must be mounted: a pull through the snapshotter mounts them). What a layer holds is
read from the holder each time progress is asked for, never counted on the side: a rerun
fetches only what is missing, and a finished job's percentages stay true.

Jobs run LAYER_WORKERS layers at a time, in runs of at most RUN_BYTES per registry request.
A chunk that fails is retried by the fetcher (mirrors, origin, backoff); a layer that still
fails ends the job as failed, naming the layer and the reason. Every chunk is verified
against its table like any read's.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from apull_node.daemon.blob_registry import BlobConfig
from apull_node.daemon.blob_source import (
    RegistrySource,
    TableError,
    TableStore,
    digest_of,
    location_of,
)
from apull_node.daemon.chunk_cache import BlobSpec, ChunkUnavailableError
from apull_node.daemon.counters import Counters
from apull_node.daemon.image_warmup import apull_layers
from apull_node.daemon.registry_fetch import BlobLocation, FetchError, RangeFetcher
from apull_node.image.oci import (
    INDEXES,
    ManifestError,
    media_type_of,
    parse_index,
    pick_platform,
)

log = logging.getLogger("apulld.prewarm")
#: Layers of one image filled at once (each one registry request at a time).
LAYER_WORKERS = 3
#: Most bytes asked of the registry in one request.
RUN_BYTES = 4 << 20
#: Finished jobs kept for GET (oldest dropped first).
KEEP_JOBS = 64


#: platform.machine() -> OCI architecture.
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "amd64": "amd64"}


def node_platform() -> dict[str, str]:
    """This node's OCI platform (linux/amd64, linux/arm64)."""
    machine = platform.machine()
    return {"os": "linux", "architecture": _ARCHITECTURES.get(machine, machine)}


class NotHeldError(Exception):
    """The backend cannot take chunks of this layer now (fscache: it is not mounted)."""


class PrewarmBusyError(Exception):
    """KEEP_JOBS prewarms are running: no room for another one now."""


class ChunkHolder(Protocol):
    """Where a backend keeps chunks, as prewarm sees it."""

    def held(self, config: BlobConfig, chunk_size: int) -> list[bool]:
        """Which chunks of the layer are held; NotHeldError (or OSError) when it cannot
        say. Needs no chunk table."""

    def fill(self, config: BlobConfig, spec: BlobSpec, source: RegistrySource,
             offset: int, size: int) -> int:  # fmt: skip
        """Fetch, verify and keep exactly the missing chunks of [offset, offset + size) (no
        read-ahead, not a read); the bytes fetched. NotHeldError, ChunkUnavailableError or
        OSError when it cannot."""


Ranges = dict[str, list[tuple[int, int]]]


@dataclass
class _Layer:
    config: BlobConfig
    startup: set[int] = field(default_factory=set)  # chunk indexes of the start-up set
    error: str = ""


@dataclass
class WarmJob:
    """One prewarm of one image: what was asked, where it stands."""

    manifest: BlobLocation
    whole: bool
    state: str = "warming"  # warming | warm | failed
    lazy: bool = True  # False: the image has no apull layers (a pull is all it needs)
    error: str = ""
    fetched: int = 0
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    layers: list[_Layer] = field(default_factory=list)


def chunk_indexes(ranges: list[tuple[int, int]], chunk: int, size: int) -> set[int]:
    """The chunks that hold the byte ranges [offset, offset + length) (cut at `size`)."""
    found: set[int] = set()
    for offset, length in ranges:
        end = min(offset + length, size)
        if offset < 0 or length <= 0 or offset >= end:
            continue
        found.update(range(offset // chunk, (end - 1) // chunk + 1))
    return found


def runs(indexes: list[int], chunk: int, most: int) -> list[tuple[int, int]]:
    """Sorted chunk indexes as (offset, size) runs of neighbours, each at most `most` bytes
    (at least one chunk)."""
    found: list[tuple[int, int]] = []
    per_run = max(1, most // chunk)
    first = previous = -2
    for index in sorted(indexes):
        if index == previous + 1 and index - first < per_run:
            previous = index
            continue
        if first >= 0:
            found.append((first * chunk, (previous - first + 1) * chunk))
        first = previous = index
    if first >= 0:
        found.append((first * chunk, (previous - first + 1) * chunk))
    return found


class ImagePrewarm:
    """Prewarm jobs, one per manifest at a time; see the module's docstring."""

    def __init__(
        self, fetcher: RangeFetcher, tables: TableStore, holder: ChunkHolder, counters: Counters
    ) -> None:
        self.fetcher = fetcher
        self.tables = tables
        self.holder = holder
        self.counters = counters
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._jobs: dict[str, WarmJob] = {}
        self._images = ThreadPoolExecutor(2, thread_name_prefix="prewarm-image")
        self._layers = ThreadPoolExecutor(LAYER_WORKERS, thread_name_prefix="prewarm-layer")

    def request(
        self, manifest: BlobLocation, data: bytes | None, whole: bool, startup: Ranges
    ) -> tuple[WarmJob, bool]:
        """The image's job and whether it was started now (False: one is running).
        PrewarmBusyError when KEEP_JOBS jobs are running."""
        with self._lock:
            job = self._jobs.get(manifest.digest)
            if job is not None and job.state == "warming":
                return job, False
            self._jobs.pop(manifest.digest, None)
            if len(self._jobs) >= KEEP_JOBS:
                ended = [d for d, j in self._jobs.items() if j.state != "warming"]
                if not ended:
                    raise PrewarmBusyError(f"{KEEP_JOBS} prewarms are running: ask again later")
                del self._jobs[ended[0]]
            job = self._jobs[manifest.digest] = WarmJob(manifest, whole)
        try:
            self._images.submit(self._run, job, data, startup)
        except RuntimeError:  # shutting down
            self._end(job, "apulld is stopping")
        return job, True

    def jobs(self, digest: str = "") -> list[dict[str, Any]]:
        """Progress of every job (or the one of `digest`), read from the holder now."""
        with self._lock:
            jobs = [j for d, j in self._jobs.items() if not digest or d == digest]
        return [self._describe(job) for job in jobs]

    def survey(self, manifest: BlobLocation) -> dict[str, Any]:
        """Where an image stands here without a prewarm (check mode): its layers and what
        the backend holds of them, fetching nothing but the manifest. State "" (none)."""
        job = WarmJob(manifest, True, state="")
        try:
            job.layers = [_Layer(config) for config in self._image(manifest, None)]
        except (FetchError, ManifestError) as err:
            job.error = f"manifest: {err}"
        job.lazy = bool(job.layers) or bool(job.error)
        job.ended = job.started
        return self._describe(job)

    def layer_digests(self, manifest: BlobLocation) -> set[str]:
        """The digests of the image's apull layers (empty when it cannot be read)."""
        try:
            return {config.digest for config in self._image(manifest, None)}
        except (FetchError, ManifestError) as err:
            log.warning("layers of %s: %s", manifest, err)
            return set()

    def close(self) -> None:
        """Stop: jobs end at their next run of chunks ("apulld is stopping")."""
        self._stopping.set()
        self._images.shutdown(wait=False, cancel_futures=True)
        self._layers.shutdown(wait=False, cancel_futures=True)

    # -- a job ----------------------------------------------------------------------------

    def _image(self, where: BlobLocation, data: bytes | None) -> list[BlobConfig]:
        """The apull layers of an image; an index is resolved to this node's platform (a
        pull's repo digest names the index of a multi-platform image)."""
        if data is None or digest_of(data, where.digest.partition(":")[0]) != where.digest:
            data = self.fetcher.fetch_manifest(where, indexes=True)
        what = f"manifest {where}"
        if media_type_of(data, "", what) in INDEXES:
            if digest_of(data, where.digest.partition(":")[0]) != where.digest:
                raise ManifestError(f"{what}: the bytes do not match the digest")
            entry = pick_platform(parse_index(data, what), node_platform(), what)
            where = BlobLocation(where.registry, where.repo, entry.digest)
            data = self.fetcher.fetch_manifest(where)
        return apull_layers(data, where)

    def _run(self, job: WarmJob, data: bytes | None, startup: Ranges) -> None:
        try:
            self._warm(job, data, startup)
        except Exception as err:  # a job never stays "warming" for good
            log.exception("prewarm of %s failed", job.manifest)
            self._end(job, f"internal error: {err}")
        finally:
            if job.state == "warming":
                self._end(job, "ended without a result")

    def _warm(self, job: WarmJob, data: bytes | None, startup: Ranges) -> None:
        try:
            configs = self._image(job.manifest, data)
        except (FetchError, ManifestError) as err:
            self._end(job, f"manifest: {err}")
            return
        if not configs:
            job.lazy = False
            self._end(job, "")
            log.info("prewarm of %s: no apull layers (not converted): the pull was all",
                     job.manifest)  # fmt: skip
            return
        job.layers = [_Layer(config) for config in configs]
        futures = []
        for layer in job.layers:
            try:
                futures.append(self._layers.submit(self._warm_layer, job, layer, startup))
            except RuntimeError:
                layer.error = "apulld is stopping"
        for future in futures:
            job.fetched += future.result()
        failed = [f"layer {layer.config.digest}: {layer.error}" for layer in job.layers
                  if layer.error]  # fmt: skip
        self._end(job, "; ".join(failed) or self._short(job, bool(startup)))
        log.info(
            "prewarm of %s %s: %d layers, %d bytes fetched in %.1f s%s",
            job.manifest, job.state, len(job.layers), job.fetched,
            job.ended - job.started, f" ({job.error})" if job.error else "",
        )  # fmt: skip

    def _short(self, job: WarmJob, asked_startup: bool) -> str:
        """Why a job whose chunks all came is not warm after all, read from the holder:
        what it fetched is not all held (the file backend's cache limit), or a start-up
        set asked alone names none of the image's layers."""
        done = self._describe(job)
        if job.whole and done["cached"] < done["bytes"]:
            return (
                f"the cache holds {done['cached']} of the image's {done['bytes']} bytes after "
                "the prewarm: its limit is smaller than what it was asked to hold"
            )
        if done["startup_cached"] < done["startup_bytes"]:
            return (
                f"the cache holds {done['startup_cached']} of the start-up set's "
                f"{done['startup_bytes']} bytes after the prewarm"
            )
        if asked_startup and not job.whole and not done["startup_bytes"]:
            return "the start-up set names none of the image's layers: nothing was warmed"
        return ""

    def _end(self, job: WarmJob, error: str) -> None:
        with self._lock:
            job.error = error
            job.state = "failed" if error else "warm"
            job.ended = time.time()

    def _warm_layer(self, job: WarmJob, layer: _Layer, startup: Ranges) -> int:
        config = layer.config
        fetched = 0
        try:
            chunk = config.chunk_size
            layer.startup = chunk_indexes(startup.get(config.digest, []), chunk, config.size)
            held = self.holder.held(config, chunk)
            wanted = sorted(layer.startup)
            order = [wanted]
            if job.whole:
                order.append([i for i in range(len(held)) if i not in layer.startup])
            missing = [[i for i in part if not held[i]] for part in order]
            if not any(missing):
                return 0
            spec = BlobSpec(config.digest, config.size, self.tables.get(config))
            source = RegistrySource(self.fetcher, location_of(config))
            for part in missing:
                for offset, size in runs(part, chunk, RUN_BYTES):
                    if self._stopping.is_set():
                        layer.error = "apulld is stopping"
                        return fetched
                    fetched += self.holder.fill(config, spec, source, offset, size)
        except (TableError, NotHeldError, ChunkUnavailableError, FetchError, OSError) as err:
            layer.error = str(err) or type(err).__name__
        finally:
            self.counters.add("prewarmed_bytes", fetched)
        return fetched

    def _describe(self, job: WarmJob) -> dict[str, Any]:
        total = held_bytes = startup_total = startup_held = 0
        layers = []
        for layer in list(job.layers):
            config = layer.config
            chunk = config.chunk_size
            total += config.size
            entry: dict[str, Any] = {"digest": config.digest, "size": config.size}
            if layer.error:
                entry["error"] = layer.error
            try:
                held = self.holder.held(config, chunk)
            except (NotHeldError, OSError) as err:
                entry.setdefault("error", str(err) or type(err).__name__)
                held = []
            sizes = [min(chunk, config.size - i * chunk) for i in range(len(held))]
            cached = sum(size for size, has in zip(sizes, held) if has)
            held_bytes += cached
            entry["cached"] = cached
            startup_total += sum(min(chunk, config.size - i * chunk) for i in layer.startup)
            startup_held += sum(sizes[i] for i in layer.startup if i < len(held) and held[i])
            layers.append(entry)
        return {
            "registry": job.manifest.registry,
            "repo": job.manifest.repo,
            "manifest": job.manifest.digest,
            "state": job.state,
            "lazy": job.lazy,
            "error": job.error,
            "whole": job.whole,
            "bytes": total,
            "cached": held_bytes,
            "startup_bytes": startup_total,
            "startup_cached": startup_held,
            "fetched": job.fetched,
            "started": job.started,
            "seconds": round((job.ended or time.time()) - job.started, 3),
            "layers": layers,
        }
