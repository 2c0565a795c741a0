"""Failures the snapshotter reports, one class per gRPC status containerd understands.

containerd's proxy client turns the status codes back into its errdefs (NotFound,
AlreadyExists, ...); unpacking, for one, treats AlreadyExists as "this layer is already here".
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Base class; anything else raised by the snapshotter is an internal error."""


class NotFoundError(SnapshotError):
    pass


class AlreadyExistsError(SnapshotError):
    pass


class FailedPreconditionError(SnapshotError):
    """The snapshot exists but is in the wrong state (has children, is not active, ...)."""


class InvalidArgumentError(SnapshotError):
    pass


class StepError(SnapshotError):
    """A step on the snapshotter's own files failed (the message names the step and the
    path, and the OS error); containerd sees UNKNOWN with that message."""
