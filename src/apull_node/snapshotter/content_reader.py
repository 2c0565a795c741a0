"""Blobs containerd has pulled, read from its content store (containerd.services.content.v1).

At the first Prepare of a CRI pull the snapshotter reads the image manifest containerd has
just fetched and hands it to apulld with the warm-up request: apulld then starts on the
layers at once instead of fetching the manifest again (a registry round trip at the head of
every lazy pull). Best effort: anything that goes wrong means apulld fetches it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import grpc

from apull_node.snapshotter.api import content_pb2, content_pb2_grpc

log = logging.getLogger("apull-snapshotter.content-reader")
#: CRI pulls images into this containerd namespace (its manifest label is CRI's).
CRI_NAMESPACE = "k8s.io"
#: Larger manifests are left to apulld (the warm-up request stays small).
MAX_BYTES = 32 << 10
TIMEOUT_SECONDS = 2.0


class ContentReader:
    """Reads small blobs from containerd at `address` (one channel, opened on first use)."""

    def __init__(self, address: str) -> None:
        self.address = address
        # The channel connects at the first call; made here, at start-up, grpc's client
        # side is imported then (6 ms), not in the first pull.
        stub: Any = content_pb2_grpc.ContentStub  # generated code, untyped
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self._content = stub(self._channel)

    def close(self) -> None:
        """Close the channel: a process that exits with it open can abort in grpc's poller
        (Debian 11's grpcio: SIGABRT, "epoll_wait error: Bad file descriptor")."""
        self._channel.close()

    def read(self, digest: str, namespace: str = CRI_NAMESPACE) -> bytes | None:
        """The blob's bytes, checked against `digest` (sha256); None when containerd cannot
        give them, or they are larger than MAX_BYTES (logged at debug: not an error)."""
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256":
            return None
        request = content_pb2.ReadContentRequest(digest=digest)
        parts, size = [], 0
        try:
            for reply in self._content.Read(
                request, metadata=[("containerd-namespace", namespace)], timeout=TIMEOUT_SECONDS
            ):
                parts.append(reply.data)
                size += len(reply.data)
                if size > MAX_BYTES:
                    log.debug("%s in containerd is over %d bytes: not read", digest, MAX_BYTES)
                    return None
        except grpc.RpcError as err:
            log.debug("cannot read %s from containerd at %s: %s", digest, self.address, err)
            return None
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != hexdigest:
            log.debug("%s from containerd at %s does not match its digest", digest, self.address)
            return None
        return data
