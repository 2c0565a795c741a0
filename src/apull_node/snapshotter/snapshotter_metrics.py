"""The snapshotter's Prometheus metrics, one set per process, served at GET /metrics when
`[snapshotter] metrics_address` is set (service/metrics_endpoint.py).

- `apull_snapshotter_prepare_duration_seconds` (histogram; `result`: ok, already_exists,
  error): containerd's Prepare as service.py answers it. A remote (apull) layer answers
  already_exists once committed; an image's top layer waits for its layers' mounts.
- `apull_snapshotter_mount_duration_seconds` (histogram; `backend`: fscache, file;
  `result`: ok, error): mount(2) of a remote layer's EROFS, in remote.py (the kernel reads
  the layer's superblock through apulld), with its read-ahead set.

No label names a snapshot, layer or image.
"""

from __future__ import annotations

from apull_node.service.metrics import Registry

REGISTRY = Registry()
#: Seconds: a Prepare of a local snapshot takes a millisecond, an image's top layer waits
#: for its layers' mounts (a registry round trip each, the first ones cold).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

PREPARE_SECONDS = REGISTRY.histogram(
    "apull_snapshotter_prepare_duration_seconds",
    "Time to answer containerd's Prepare, seconds, by result: ok (an active snapshot), "
    "already_exists (a remote layer, committed and mounted from apulld, or a target there "
    "already), error.",
    BUCKETS,
    ("result",),
)
PREPARE_OK, PREPARE_EXISTS, PREPARE_ERROR = "ok", "already_exists", "error"

MOUNT_SECONDS = REGISTRY.histogram(
    "apull_snapshotter_mount_duration_seconds",
    "Time to mount a remote layer's EROFS from apulld, seconds, by backend and result.",
    BUCKETS,
    ("backend", "result"),
)
