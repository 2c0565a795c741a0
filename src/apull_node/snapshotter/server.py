"""The gRPC server on a unix socket (mode 0600), serving one OverlaySnapshotter."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

import apull_node.snapshotter.api.snapshots_pb2_grpc as snapshots_pb2_grpc
from apull_node.service.sockets import prepare_socket_path, restrict_socket
from apull_node.snapshotter.overlay import OverlaySnapshotter
from apull_node.snapshotter.service import SnapshotsService

log = logging.getLogger("apull-snapshotter.server")

#: Parallel RPCs; metadata work is serialised anyway, but disk usage walks are not.
WORKERS = 16


class SnapshotterServer:
    def __init__(self, snapshotter: OverlaySnapshotter, address: str) -> None:
        self.snapshotter = snapshotter
        self.address = os.path.abspath(address)
        self._server: Any = None
        self._socket_ino: int | None = None

    def start(self) -> None:
        """Bind (refusing a live socket, replacing a stale one), restrict to 0600, serve."""
        prepare_socket_path(self.address)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="snapshots")
        )
        register: Callable[[Any, Any], None] = snapshots_pb2_grpc.add_SnapshotsServicer_to_server
        register(SnapshotsService(self.snapshotter), server)
        if server.add_insecure_port(f"unix:{self.address}") == 0:
            raise OSError(f"cannot listen on {self.address}")
        restrict_socket(self.address)
        self._socket_ino = os.lstat(self.address).st_ino
        server.start()
        self._server = server
        log.info("serving containerd snapshots on %s", self.address)

    def stop(self, grace: float = 5.0) -> None:
        """Finish running RPCs (up to `grace` seconds), then remove our socket."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.address)
            # Only our own socket: a successor may already listen on the same path.
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._socket_ino:
                os.unlink(self.address)
