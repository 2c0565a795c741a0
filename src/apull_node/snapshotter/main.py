"""apull-containerd-grpc: run the snapshotter until SIGTERM or SIGINT.

Settings come from [snapshotter] and [global] in /etc/apull/config.toml; --address and --root
override them. apull layers are mounted from apulld ([snapshotter] apulld_address) as remote
snapshots; at start those already committed are mounted again. Readiness is reported to
systemd (Type=notify) once the socket is bound and restricted to 0600.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import NoReturn

from apull_node.service import sdnotify
from apull_node.service.logs import setup_logging
from apull_node.service.metrics_endpoint import serve_metrics
from apull_node.service.settings import (
    DEFAULT_CONFIG_PATH,
    SettingsError,
    load_settings,
    parse_listen_address,
)
from apull_node.service.sockets import SocketInUseError

SERVICE = "apull-containerd-grpc"
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SERVICE, description="containerd proxy snapshotter")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="settings file")
    parser.add_argument("--address", help="unix socket to serve on ([snapshotter] address)")
    parser.add_argument("--root", help="metadata and snapshots directory ([snapshotter] root)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Block the stop signals before any thread exists (threads inherit the mask, so none can
    # take them), then wait for them synchronously once serving.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    args = _arguments(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as err:
        print(f"{SERVICE}: {err}", file=sys.stderr)
        return 2
    log = setup_logging("apull-snapshotter", settings.global_.log_level)
    address = args.address or settings.snapshotter.address
    root = Path(args.root or settings.snapshotter.root)

    from apull_node.snapshotter.startup_checks import problems

    found = problems(root)
    for problem in found:
        log.error("cannot start: %s", problem)
    if found:
        return 1
    # Imported here so that a settings error is reported even where grpc is broken.
    from apull_node.snapshotter.apulld_client import ApulldClient
    from apull_node.snapshotter.content_reader import ContentReader
    from apull_node.snapshotter.overlay import OverlaySnapshotter
    from apull_node.snapshotter.remote import RemoteSnapshots
    from apull_node.snapshotter.server import SnapshotterServer
    from apull_node.snapshotter.snapshotter_metrics import REGISTRY

    containerd = settings.snapshotter.containerd_address
    content = ContentReader(containerd) if containerd else None
    remote = RemoteSnapshots(
        ApulldClient(settings.snapshotter.apulld_address),
        content,
        read_ahead_kb=settings.snapshotter.layer_read_ahead_kb,
    )
    try:
        snapshotter = OverlaySnapshotter(
            root, [remote.prepare], [remote.removed], [remote.parents_ready], [remote.removing]
        )
    except (OSError, RuntimeError, sqlite3.Error) as err:
        log.error("cannot open %s: %s", root, err)
        if content is not None:
            content.close()
        return 1
    # Before containerd can start containers on them: remote layers mounted again.
    remote.restore(snapshotter)
    server = SnapshotterServer(snapshotter, address)
    try:
        server.start()
    except (OSError, SocketInUseError) as err:
        log.error("cannot serve on %s: %s", address, err)
        remote.close()
        snapshotter.close()
        if content is not None:
            content.close()
        return 1
    # Checked with the settings; an address that cannot be bound is logged, not fatal.
    metrics_address = parse_listen_address(settings.snapshotter.metrics_address)
    metrics = serve_metrics(metrics_address, REGISTRY, log)
    sdnotify.ready(f"serving {address}")
    log.info("ready: root %s, socket %s", root, address)
    received = signal.sigwait(_STOP_SIGNALS)
    log.info("%s: stopping", signal.Signals(received).name)
    sdnotify.stopping()
    if metrics is not None:
        metrics.stop()
    server.stop()
    remote.close()
    snapshotter.close()
    if content is not None:
        content.close()
    return 0


def run() -> NoReturn:
    """main(), then exit at once: the binary's entry. At interpreter teardown grpc's event
    engine thread (Debian 11's grpcio) can abort the process (SIGABRT, "epoll_wait error:
    Bad file descriptor") after main() returned: everything main() opened is closed by
    then, so the output is flushed and the process ends without that teardown."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
