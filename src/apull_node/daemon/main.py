"""apulld: the node daemon. Chooses the cache backend, holds it, answers the HTTP API.

    apulld [--config PATH] [--address SOCK] [--cache-dir DIR] [--backend B] [--log-level L]
    apulld --check-backend    print the backend this node would get and why, then exit

--check-backend binds no socket and keeps nothing open; to prove fscache it opens
/dev/cachefiles, binds the cache dir on-demand and closes it again, so it reports the device
busy while an apulld runs (ask that one with PUT /v1.0/apulld/ping instead).
Exit status: 0 ok, 1 startup error (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from apull_node import __version__
from apull_node.daemon import apulld_metrics, fdstore
from apull_node.daemon.backend import (
    BackendChoice,
    BackendUnavailableError,
    choose_backend,
    make_private_dir,
)
from apull_node.daemon.blob_registry import BlobRegistry, BlobStoreError
from apull_node.daemon.file_backend import FileBackend, FileBackendConfig, FileBackendError
from apull_node.daemon.fscache_backend import FscacheBackend, FscacheBackendConfig
from apull_node.daemon.http_api import ApiState, ApulldHttpServer
from apull_node.daemon.image_prewarm import ImagePrewarm
from apull_node.daemon.image_warmup import ImageWarmup
from apull_node.daemon.peer_server import PeerServer, resolve_allowed
from apull_node.daemon.registry_fetch import FetchSettings
from apull_node.daemon.serving import BackendStartError, ServingBackend
from apull_node.image.registry_mirrors import parse_mirrors
from apull_node.service import sdnotify
from apull_node.service.logs import setup_logging
from apull_node.service.metrics_endpoint import serve_metrics
from apull_node.service.settings import (
    BACKENDS,
    DEFAULT_CONFIG_PATH,
    LOG_LEVELS,
    ApulldSettings,
    SettingsError,
    load_settings,
    parse_listen_address,
)
from apull_node.service.sockets import SocketInUseError, prepare_socket_path, restrict_socket


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apulld", description="apull node daemon")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="settings file")
    parser.add_argument("--address", help="unix socket of the HTTP API")
    parser.add_argument("--cache-dir", help="cachefiles cache directory")
    parser.add_argument("--backend", choices=BACKENDS, help="cache backend (default: auto)")
    parser.add_argument("--log-level", choices=LOG_LEVELS)
    parser.add_argument(
        "--check-backend", action="store_true", help="print the backend and reasons, then exit"
    )
    parser.add_argument("--version", action="version", version=f"apulld {__version__}")
    return parser


def state_dir(cache_dir: str) -> Path:
    """Where apulld keeps its own files: next to the cache dir (cachefiles owns that one)."""
    return Path(cache_dir).parent / "apulld"


def check_backend(settings: ApulldSettings) -> int:
    try:
        choice = choose_backend(
            settings.backend, settings.cache_dir, settings.fscache_tag, hold=False
        )
    except BackendUnavailableError as err:
        print(f"apulld: {err}", file=sys.stderr)
        return 1
    print(choice.name)
    for reason in choice.reasons:
        print(f"- {reason}")
    return 0


def fetch_settings(settings: ApulldSettings) -> FetchSettings:
    """Registry access settings (ValueError: a bad mirror entry)."""
    insecure = frozenset(h.strip() for h in settings.registry_insecure if h.strip())
    return FetchSettings(
        mirrors=parse_mirrors(settings.registry_mirrors),
        peers=tuple(settings.peers),
        insecure=insecure,
        auth_file=Path(settings.registry_auth_file) if settings.registry_auth_file else None,
        retries=max(0, settings.fetch_retries),
        timeout=float(max(1, settings.fetch_timeout_s)),
        schemes_file=state_dir(settings.cache_dir) / "registry-schemes.json",
    )


def file_backend_config(settings: ApulldSettings) -> FileBackendConfig:
    """The file backend's paths and registry settings (ValueError: a bad mirror entry)."""
    fetch = fetch_settings(settings)
    mountpoint = settings.fuse_mountpoint or str(state_dir(settings.cache_dir) / "fuse")
    return FileBackendConfig(
        cache_dir=Path(settings.cache_dir),
        mountpoint=Path(os.path.abspath(mountpoint)),
        fetch=fetch,
        cache_limit_bytes=max(1, settings.cache_size_limit_mb) << 20,
        threads=max(2, settings.thread_num),
        whole_max_bytes=whole_max_bytes(settings),
    )


def whole_max_bytes(settings: ApulldSettings) -> int:
    """Layers of at most this size are fetched whole (prefetch_layer_max_mb; 0: prefetch
    off, each read fetches its own chunks)."""
    return max(0, settings.prefetch_layer_max_mb) << 20 if settings.prefetch_enable else 0


def discard_fds(inherited: dict[str, int], log: logging.Logger) -> None:
    """Close fds from the fd store this apulld has no use for, and drop them from it."""
    for name, fd in inherited.items():
        log.warning("closing inherited fd %d (%s): not ours", fd, name)
        with contextlib.suppress(OSError):
            os.close(fd)
        fdstore.remove(name)


def _file_backend(
    settings: ApulldSettings, blobs: BlobRegistry, inherited: dict[str, int], log: logging.Logger
) -> ServingBackend:
    fuse_fd = inherited.pop(fdstore.FUSE_FD_NAME, None)
    discard_fds(inherited, log)
    backend = FileBackend(file_backend_config(settings), blobs)
    backend.start(fuse_fd)
    return backend


def _fscache_backend(
    settings: ApulldSettings,
    blobs: BlobRegistry,
    choice: BackendChoice,
    inherited: dict[str, int],
    log: logging.Logger,
) -> ServingBackend:
    assert choice.device_fd is not None
    objects = {n: fd for n, fd in inherited.items() if fdstore.parse_object_fd_name(n)}
    discard_fds({n: fd for n, fd in inherited.items() if n not in objects}, log)
    config = FscacheBackendConfig(
        cache_dir=Path(settings.cache_dir),
        state_dir=state_dir(settings.cache_dir),
        fetch=fetch_settings(settings),
        threads=max(1, settings.thread_num),
        # Peers are served from apulld's own chunk cache: the kernel's cache files of
        # mounted layers cannot be read back.
        keep_limit_bytes=(max(1, settings.cache_size_limit_mb) << 20)
        if settings.peer_address
        else 0,
    )
    backend = FscacheBackend(config, blobs)
    backend.start(choice.device_fd, choice.inherited, objects)
    return backend


def start_backend(
    settings: ApulldSettings,
    blobs: BlobRegistry,
    choice: BackendChoice,
    inherited: dict[str, int],
    log: logging.Logger,
) -> ServingBackend | None:
    """The chosen backend, started (None for "none"); BackendStartError names what failed.

    Each backend's start cleans up after itself when it fails (serving.py's contract)."""
    try:
        if choice.name == "file":
            return _file_backend(settings, blobs, inherited, log)
        if choice.name == "fscache":
            return _fscache_backend(settings, blobs, choice, inherited, log)
    except (OSError, ValueError, FileBackendError) as err:
        raise BackendStartError(f"cannot start the {choice.name} backend: {err}") from err
    discard_fds(inherited, log)
    return None


def image_warmup(settings: ApulldSettings, backend: ServingBackend | None) -> ImageWarmup | None:
    """Warm-ups of pulled images with the backend's fetcher and caches (prefetch_enable)."""
    if backend is None or not settings.prefetch_enable:
        return None
    return ImageWarmup(
        backend.fetcher, backend.tables, backend.cache, backend.counters, whole_max_bytes(settings)
    )


def serve_peers(
    settings: ApulldSettings, backend: ServingBackend | None, log: logging.Logger
) -> PeerServer | None:
    """The peer server on [apulld] peer_address (None: off, or no backend to serve from);
    a bind failure is logged and sharing stays off (reads still work)."""
    address = parse_listen_address(settings.peer_address)  # checked with the settings
    if address is None or backend is None:
        return None
    try:
        server = PeerServer(address, resolve_allowed(settings.peer_allow), backend.cache)
    except OSError as err:
        log.error("cannot serve peers on %s: %s; chunk sharing is off", settings.peer_address, err)
        return None
    server.start()
    return server


def serve(settings: ApulldSettings, log: logging.Logger, started: float) -> int:
    os.umask(0o077)
    try:
        make_private_dir(settings.cache_dir)
        blobs_dir = make_private_dir(state_dir(settings.cache_dir))
        blobs = BlobRegistry.load(blobs_dir / "blobs.json")
        inherited = fdstore.inherited_fds()
        device_fd = inherited.pop(fdstore.DEVICE_FD_NAME, None)
        choice = choose_backend(
            settings.backend,
            settings.cache_dir,
            settings.fscache_tag,
            inherited_device=device_fd,
        )
        if device_fd is not None and not choice.inherited:
            fdstore.remove(fdstore.DEVICE_FD_NAME)
        prepare_socket_path(settings.address)
    except (OSError, BlobStoreError, BackendUnavailableError, SocketInUseError) as err:
        log.error("cannot start: %s", err)
        return 1
    log.info("backend %s chosen: %s", choice.name, "; ".join(choice.reasons))
    # Everything opened from here on is undone in reverse order, however serve() leaves.
    with contextlib.ExitStack() as held:
        try:
            backend = start_backend(settings, blobs, choice, inherited, log)
        except BackendStartError as err:
            log.error("%s", err)
            return 1
        if backend is not None:
            held.callback(backend.stop)
        warmup = image_warmup(settings, backend)
        if warmup is not None:
            held.callback(warmup.close)
        prewarm = None
        if backend is not None:
            prewarm = ImagePrewarm(backend.fetcher, backend.tables, backend, backend.counters)
            held.callback(prewarm.close)
        peers = serve_peers(settings, backend, log)
        if peers is not None:
            held.callback(peers.stop)
        address = parse_listen_address(settings.metrics_address)  # checked with the settings
        metrics = serve_metrics(address, apulld_metrics.REGISTRY, log)
        if metrics is not None:
            held.callback(metrics.stop)
        try:
            state = ApiState(
                backend=choice,
                blobs=blobs,
                serving=backend,
                warmup=warmup,
                prewarm=prewarm,
                startup=backend.startup if backend is not None else None,
            )
            server = ApulldHttpServer(settings.address, state)
            restrict_socket(settings.address)
        except OSError as err:
            log.error("cannot listen on %s: %s", settings.address, err)
            return 1
        held.callback(_remove_socket, settings.address)
        held.callback(server.server_close)
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("%s: shutting down", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # A short poll interval only makes shutdown quicker; requests are served at once.
        threading.Thread(target=server.serve_forever, args=(0.1,), name="http", daemon=True).start()
        held.callback(server.shutdown)
        try:
            sdnotify.ready(f"backend {choice.name}, {len(blobs)} blobs")
        except OSError as err:
            log.warning("cannot tell systemd we are ready: %s", err)
        log.info(
            "ready in %.2fs: backend %s, %d blobs (%s), listening on %s",
            time.monotonic() - started,
            choice.name,
            len(blobs),
            blobs.path,
            settings.address,
        )
        stop.wait()
        with contextlib.suppress(OSError):
            sdnotify.stopping()
    log.info("stopped")
    return 0


def _remove_socket(address: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)


#: mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_freed_buffers() -> None:
    """Let glibc reuse freed receive buffers instead of returning them to the kernel.

    A streaming read fetches 16 MiB windows; glibc serves allocations that large with fresh
    mmap()s and unmaps them on free, so every window paid page faults and the kernel's
    zeroing of 16 MiB (about a tenth of apulld's CPU in a cold read). Kept in the heap, they
    are reused: the cold read of make bench's 256 MiB file took 17k page faults instead of
    27-35k, and ran at 490 instead of 455 MB/s (546 vs 516 in another batch; alternating
    runs, medians). One arena for all threads: the prefetch threads' windows came from
    per-thread arenas, which gave freed memory back and faulted it in again (16.8k faults
    per cold read; 12.4-16k with one arena, 12.3k being the three windows' first use). The
    interpreter lock already serialises most allocations. Bounded: apulld holds a few
    windows at a time. Not glibc: nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum; larger requests mmap
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    # Threads waiting on I/O (a FUSE read, an API call) get the interpreter back sooner
    # from threads that compute (hashing, JSON): 0.5 ms instead of Python's 5 ms.
    sys.setswitchinterval(0.0005)
    keep_freed_buffers()
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(Path(args.config))
    except SettingsError as err:
        print(f"apulld: {err}", file=sys.stderr)
        return 1
    overrides = {
        key: value
        for key, value in (
            ("address", args.address),
            ("backend", args.backend),
            ("cache_dir", args.cache_dir),
        )
        if value is not None
    }
    apulld = dataclasses.replace(settings.apulld, **overrides)
    apulld = dataclasses.replace(apulld, cache_dir=os.path.abspath(apulld.cache_dir))
    log = setup_logging("apulld", args.log_level or settings.global_.log_level)
    if args.check_backend:
        return check_backend(apulld)
    log.info(
        "apulld %s starting: backend=%s cache_dir=%s address=%s",
        __version__,
        apulld.backend,
        apulld.cache_dir,
        apulld.address,
    )
    return serve(apulld, log, started)


if __name__ == "__main__":
    sys.exit(main())
