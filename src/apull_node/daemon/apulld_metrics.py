"""apulld's Prometheus metrics, one set per process, updated where the events happen and
served at GET /metrics when `[apulld] metrics_address` is set (service/metrics_endpoint.py).

- `apull_registry_fetched_bytes_total` (counter; `kind`: layer, chunk_table, manifest) and
  `apull_registry_fetch_duration_seconds` (histogram of range requests that returned their
  bytes), in registry_fetch.py;
- `apull_registry_errors_total` (counter; `status`: the HTTP status, `error` for no answer
  - connection, TLS, timeout - or `invalid` for an answer apulld cannot use), each failed
  try of an endpoint, in registry_fetch.py;
- `apull_served_bytes_total` (counter; `backend`: file, fscache), in file_backend.py and
  fscache_backend.py;
- `apull_chunk_cache_hits_total` and `apull_chunk_cache_misses_total` (counters, in
  chunks a read wanted) and `apull_chunk_verify_failures_total` (counter; `source`:
  registry, cache), in chunk_cache.py.

No label names a blob, layer, repository or registry: label values are few and fixed (and
capped by service/metrics.py all the same). The `Counters` in each backend stay what ping
reports; these are the same events for a scraper, across backends.
"""

from __future__ import annotations

from apull_node.service.metrics import Registry

REGISTRY = Registry()
#: Seconds; a range request times out after fetch_timeout_s (30 by default).
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REGISTRY_FETCHED_BYTES = REGISTRY.counter(
    "apull_registry_fetched_bytes_total",
    "Bytes received from registries and mirrors: layer data (chunk ranges and small layers "
    "fetched whole), chunk tables, image manifests.",
    ("kind",),
)
FETCHED_LAYER_BYTES = REGISTRY_FETCHED_BYTES.labels("layer")
FETCHED_TABLE_BYTES = REGISTRY_FETCHED_BYTES.labels("chunk_table")
FETCHED_MANIFEST_BYTES = REGISTRY_FETCHED_BYTES.labels("manifest")

REGISTRY_FETCH_SECONDS = REGISTRY.histogram(
    "apull_registry_fetch_duration_seconds",
    "Time of each registry range request that returned its bytes (login and redirects "
    "included), seconds.",
    FETCH_BUCKETS,
)

REGISTRY_ERRORS = REGISTRY.counter(
    "apull_registry_errors_total",
    "Failed tries of a registry or mirror request, by HTTP status; error: no answer "
    "(connection, TLS, timeout); invalid: an answer apulld cannot use.",
    ("status",),
)
#: Status label values besides HTTP statuses.
STATUS_NO_ANSWER = "error"
STATUS_INVALID = "invalid"

SERVED_BYTES = REGISTRY.counter(
    "apull_served_bytes_total",
    "Verified bytes handed to the kernel: FUSE reads (file backend), cache file writes "
    "(fscache backend, without block padding).",
    ("backend",),
)
SERVED_FILE_BYTES = SERVED_BYTES.labels("file")
SERVED_FSCACHE_BYTES = SERVED_BYTES.labels("fscache")

CACHE_HITS = REGISTRY.counter(
    "apull_chunk_cache_hits_total",
    "Chunks a read found in apulld's chunk cache (verified).",
)
CACHE_MISSES = REGISTRY.counter(
    "apull_chunk_cache_misses_total",
    "Chunks a read did not find in apulld's chunk cache: fetched, or waited for while "
    "another read fetched them (the fscache backend keeps none: every chunk it is asked "
    "for is a miss).",
)

VERIFY_FAILURES = REGISTRY.counter(
    "apull_chunk_verify_failures_total",
    "Chunks whose sha256 did not match the chunk table: fetched from a registry (fetched "
    "again), or read back from the cache (damaged, fetched again).",
    ("source",),
)
VERIFY_FAILURES_REGISTRY = VERIFY_FAILURES.labels("registry")
VERIFY_FAILURES_CACHE = VERIFY_FAILURES.labels("cache")

PEER_REQUESTS = REGISTRY.counter(
    "apull_peer_requests_total",
    "Range requests from other nodes (peer_address), by outcome: served (every chunk held "
    "and checked here), missing (404: the peer asks elsewhere), refused (not on the "
    "allow-list).",
    ("outcome",),
)
PEER_SERVED_BYTES = REGISTRY.counter(
    "apull_peer_served_bytes_total",
    "Verified chunk bytes sent to other nodes.",
)
PEER_FETCHED_BYTES = REGISTRY.counter(
    "apull_peer_fetched_bytes_total",
    "Layer bytes received from other nodes (peers) instead of a registry; not in "
    "apull_registry_fetched_bytes_total.",
)
