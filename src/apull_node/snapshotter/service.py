"""The gRPC servicer: containerd's Snapshots API on top of OverlaySnapshotter.

Each RPC is logged at debug; failures become the status codes containerd's proxy client maps
back to its errdefs (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument) and are
logged at warning; anything unexpected is Unknown, logged with its traceback.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, text_format, timestamp_pb2

import apull_node.snapshotter.api.mount_pb2 as mount_pb2
import apull_node.snapshotter.api.snapshots_pb2 as snapshots_pb2
from apull_node.snapshotter import snapshotter_metrics as metrics
from apull_node.snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SnapshotError,
)
from apull_node.snapshotter.mounts import Mount
from apull_node.snapshotter.overlay import OverlaySnapshotter
from apull_node.snapshotter.store import Info

log = logging.getLogger("apull-snapshotter.service")

#: List answers in batches of this many snapshots per message.
LIST_BATCH = 100

_STATUS = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
}

_Result = TypeVar("_Result")
_Handler = Callable[["SnapshotsService", Any, Any], _Result]


def _status(err: SnapshotError) -> Any:
    for cls, code in _STATUS.items():
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.UNKNOWN


class _Described:
    """A request as one line of text, made only when a log line is written (formatting a
    Prepare's labels costs more than answering it)."""

    def __init__(self, request: Any) -> None:
        self.request = request

    def __str__(self) -> str:
        return str(text_format.MessageToString(self.request, as_one_line=True))


def _describe(request: Any) -> _Described:
    return _Described(request)


def _abort(context: Any, name: str, err: Exception) -> None:
    """Log the failure and end the RPC with its status (context.abort raises)."""
    if isinstance(err, AlreadyExistsError):
        # The normal answer for a remote snapshot (and for containerd's retries).
        code = _status(err)
        log.debug("%s: %s: %s", name, code.name, err)
    elif isinstance(err, SnapshotError):
        code = _status(err)
        log.warning("%s failed (%s): %s", name, code.name, err)
    else:
        code = grpc.StatusCode.UNKNOWN
        log.error("%s failed unexpectedly", name, exc_info=err)
    context.abort(code, str(err) or type(err).__name__)


def _unary(method: _Handler[_Result]) -> _Handler[_Result]:
    """Log the call; map failures to gRPC statuses."""

    @functools.wraps(method)
    def wrapper(self: SnapshotsService, request: Any, context: Any) -> _Result:
        log.debug("%s %s", method.__name__, _describe(request))
        try:
            return method(self, request, context)
        except Exception as err:
            _abort(context, method.__name__, err)
            raise  # not reached: abort raises

    return wrapper


def _mounts(mounts: Iterable[Mount]) -> list[Any]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _timestamp(ns: int) -> Any:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=info.kind.name,  # enum values by name: ours mirror the wire enum
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=info.labels,
    )


class SnapshotsService:
    """containerd.services.snapshots.v1.Snapshots; `snapshotter` in requests is ignored."""

    def __init__(self, snapshotter: OverlaySnapshotter) -> None:
        self.snapshotter = snapshotter

    @_unary
    def Prepare(
        self, request: snapshots_pb2.PrepareSnapshotRequest, context: Any
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        started, result = time.monotonic(), metrics.PREPARE_ERROR
        try:
            mounts = self.snapshotter.prepare(request.key, request.parent, dict(request.labels))
            result = metrics.PREPARE_OK
        except AlreadyExistsError:
            result = metrics.PREPARE_EXISTS
            raise
        finally:
            metrics.PREPARE_SECONDS.labels(result).observe(time.monotonic() - started)
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_unary
    def View(
        self, request: snapshots_pb2.ViewSnapshotRequest, context: Any
    ) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = self.snapshotter.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_unary
    def Mounts(
        self, request: snapshots_pb2.MountsRequest, context: Any
    ) -> snapshots_pb2.MountsResponse:
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.snapshotter.mounts(request.key)))

    @_unary
    def Commit(self, request: snapshots_pb2.CommitSnapshotRequest, context: Any) -> Any:
        self.snapshotter.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_unary
    def Remove(self, request: snapshots_pb2.RemoveSnapshotRequest, context: Any) -> Any:
        self.snapshotter.remove(request.key)
        return empty_pb2.Empty()

    @_unary
    def Stat(
        self, request: snapshots_pb2.StatSnapshotRequest, context: Any
    ) -> snapshots_pb2.StatSnapshotResponse:
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.snapshotter.stat(request.key)))

    @_unary
    def Update(
        self, request: snapshots_pb2.UpdateSnapshotRequest, context: Any
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        info = self.snapshotter.update(
            request.info.name, dict(request.info.labels), list(request.update_mask.paths)
        )
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(info))

    def List(
        self, request: snapshots_pb2.ListSnapshotsRequest, context: Any
    ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        log.debug("List %s", _describe(request))
        try:
            infos = self.snapshotter.walk(list(request.filters))
        except Exception as err:
            _abort(context, "List", err)
            raise  # not reached
        for start in range(0, len(infos), LIST_BATCH):
            batch = infos[start : start + LIST_BATCH]
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info(i) for i in batch])

    @_unary
    def Usage(
        self, request: snapshots_pb2.UsageRequest, context: Any
    ) -> snapshots_pb2.UsageResponse:
        usage = self.snapshotter.usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_unary
    def Cleanup(self, request: snapshots_pb2.CleanupRequest, context: Any) -> Any:
        removed = self.snapshotter.cleanup()
        if removed:
            log.info("Cleanup removed %s", ", ".join(p.name for p in removed))
        return empty_pb2.Empty()
