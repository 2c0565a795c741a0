"""Byte ranges of registry blobs for apulld: which endpoint, how often, and what counts.

Every request goes through the one registry client, `registry_session.RegistrySession` (one
per endpoint and repository, sharing `registry_connections.Connections`): keep-alive
connections, so each chunk costs one request, not a handshake; auth as the distribution spec
has it, tokens kept per endpoint and repository and renewed on a 401, the auth file read
anew at each challenge; redirects; the scheme of registries in ``registry_insecure`` (and
loopback ones, like docker) learned once and kept in a file across restarts. This module adds
apulld's policy:
- Mirrors (``registry_mirrors``) are tried before the origin with the same path and
  ``?ns=<registry>``; a mirror that fails or sends bad data rests for a while. Connections
  open under ``connect_timeout``: a mirror that is down costs one such wait, not one per chunk.
- Connection errors, timeouts, 429 and 5xx are retried with exponential backoff; errors name
  the registry, repository, digest and byte range.
- Ranges are checked (status, Content-Range, length); metrics and counters are kept.
"""

from __future__ import annotations

# socket.getaddrinfo encodes host names with the idna codec, imported on first use: 12 ms
# (unicodedata, stringprep) at the head of the first pull after apulld starts - a node that
# boots and pulls at once. Imported with apulld instead.
import encodings.idna  # noqa: F401
import http.client
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union
from urllib.parse import urlencode, urlsplit

from apull_node.daemon import apulld_metrics as metrics
from apull_node.daemon.counters import Counters
from apull_node.image.registry_auth import (
    AuthError,
    Credentials,
    find_credentials,
)
from apull_node.image.registry_connections import Connections, is_loopback
from apull_node.image.registry_mirrors import Mirror as MirrorSetting
from apull_node.image.registry_session import Mirror, RegistryError, RegistrySession, error_text

log = logging.getLogger("apulld.fetch")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
MIRROR_REST_SECONDS = 30.0
#: A mirror that answered a range of a blob with the whole blob (a pull-through cache still
#: storing it) is not asked for that blob again for this long: the reads go to the origin.
MIRROR_FILLING_SECONDS = 10.0
#: A peer that does not hold a range of a blob (404) is not asked for that blob again for
#: this long: the reads go on to the mirrors or the origin.
PEER_MISS_SECONDS = 5.0
#: After a request failed every try, more requests to that registry within this many
#: seconds get one try each: a registry that is down does not cost every read a full
#: round of backoff.
FAIL_FAST_SECONDS = 2.0
MAX_WHOLE_BLOB = 64 << 20
MAX_MANIFEST = 4 << 20
#: What apulld accepts when it fetches a manifest by digest (an image's, with layers).
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


class FetchError(RuntimeError):
    """A range could not be had; the message names registry, repository, digest, range."""


class _TryFailed(Exception):
    """One try of an endpoint failed; `status` is what the registry error metric counts it
    as: the HTTP status, or apulld_metrics.STATUS_NO_ANSWER / STATUS_INVALID."""

    def __init__(self, message: str, status: str = metrics.STATUS_INVALID) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(_TryFailed):
    """Worth trying again (elsewhere or later)."""


class _Final(_TryFailed):
    """Trying again will not help on this endpoint."""


class _Skip(_TryFailed):
    """This endpoint cannot serve this request now but is healthy: the next one serves it.
    It is not asked for this blob again for `seconds`."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


@dataclass(frozen=True)
class FetchSettings:
    mirrors: tuple[MirrorSetting, ...] = ()
    #: Other nodes' apulld (http://host:port), asked first for every registry's blobs.
    peers: tuple[str, ...] = ()
    insecure: frozenset[str] = frozenset()
    auth_file: Path | None = None
    retries: int = 4
    timeout: float = 30.0
    #: Bound on opening a connection (TCP and TLS): a mirror or registry that is down costs
    #: this once, then rests (mirrors) or fails fast, instead of `timeout` per chunk.
    connect_timeout: float = 5.0
    backoff: float = 0.25
    backoff_max: float = 4.0
    #: Where the schemes learned by probing are kept across restarts (None: not kept).
    schemes_file: Path | None = None


@dataclass(frozen=True)
class BlobLocation:
    registry: str
    repo: str
    digest: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repo}@{self.digest}"


@dataclass(frozen=True)
class _Endpoint:
    name: str  # what logs and stats call it: the netloc
    base: str  # a mirror's scheme://netloc[/prefix]; "" for the registry itself
    query: str  # "" or "?ns=<registry>"
    mirror: bool
    credentials_host: str
    peer: bool = False


@dataclass
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes | bytearray  # at most the request's limit
    complete: bool  # the whole body was read


_Taker = Callable[[_Reply], Union[bytes, bytearray]]


class RangeFetcher:
    """Shared by every blob: connection pools, tokens and mirror health live here."""

    def __init__(self, settings: FetchSettings, counters: Counters) -> None:
        self.settings = settings
        self.counters = counters
        self._lock = threading.Lock()
        self._connections = Connections(
            timeout=settings.timeout,
            connect_timeout=settings.connect_timeout,
            schemes_file=settings.schemes_file,
        )
        self._sessions: dict[tuple[str, str, str], RegistrySession] = {}
        self._resting: dict[str, float] = {}
        self._filling: dict[tuple[str, str], float] = {}
        self._failing: dict[str, float] = {}

    # -- public ---------------------------------------------------------------------------

    def fetch(
        self, blob: BlobLocation, start: int, end: int, avoid: str = ""
    ) -> tuple[bytes | bytearray, str]:
        """Bytes [start, end) of the blob and the endpoint that sent them. `avoid` names an
        endpoint that just sent bad data (it is tried last)."""
        what = f"{blob} bytes {start}-{end - 1}"
        headers = {"Range": f"bytes={start}-{end - 1}"}
        take = lambda reply: _range_body(reply, start, end)  # noqa: E731
        return self._with_retries(blob, what, headers, take, end, avoid)

    def fetch_whole(self, blob: BlobLocation, limit: int = MAX_WHOLE_BLOB) -> bytes:
        """A small blob whole (a chunk table); the caller checks its digest."""
        return bytes(self._with_retries(blob, f"{blob}", {}, _whole(limit), limit, "")[0])

    def fetch_manifest(
        self, manifest: BlobLocation, limit: int = MAX_MANIFEST, indexes: bool = False
    ) -> bytes:
        """An image manifest by digest (OCI or Docker v2; with `indexes`, an index too); the
        caller checks its digest."""
        types = MANIFEST_TYPES + (INDEX_TYPES if indexes else ())
        headers = {"Accept": ", ".join(types)}
        what = f"manifest {manifest}"
        take = _whole(limit)
        return bytes(self._with_retries(manifest, what, headers, take, limit, "", "manifests")[0])

    def mark_bad(self, endpoint: str) -> None:
        """An endpoint sent bytes that failed verification: rest it if it is a peer or a
        mirror (the origin is asked again: it is the last word)."""
        for url in (*self.settings.peers, *(m.url for m in self.settings.mirrors)):
            netloc = urlsplit(url).netloc
            if endpoint == netloc:
                peer = url in self.settings.peers
                self._rest(_Endpoint(netloc, url, "", True, netloc, peer=peer), "sent bad data")
                return

    # -- retries over endpoints -----------------------------------------------------------

    def _endpoints(self, blob: BlobLocation, avoid: str, ranged: bool) -> list[_Endpoint]:
        """Where to ask, in order: peers (chunk ranges only: a peer serves nothing else),
        mirrors for this registry, the origin; resting ones left out, `avoid` last."""
        now = time.monotonic()
        found: list[_Endpoint] = []
        query = "?" + urlencode({"ns": blob.registry})
        for peer in self.settings.peers if ranged else ():
            netloc = urlsplit(peer).netloc
            with self._lock:
                if self._resting.get(netloc, 0.0) > now:
                    continue
                if self._filling.get((netloc, blob.digest), 0.0) > now:
                    continue
            found.append(_Endpoint(netloc, peer, query, True, netloc, peer=True))
        for mirror in self.settings.mirrors:
            if mirror.registry and mirror.registry != blob.registry:
                continue
            netloc = urlsplit(mirror.url).netloc
            with self._lock:
                if self._resting.get(netloc, 0.0) > now:
                    continue
                if self._filling.get((netloc, blob.digest), 0.0) > now:
                    continue
            query = "?" + urlencode({"ns": blob.registry})
            found.append(_Endpoint(netloc, mirror.url, query, True, netloc))
        found.append(_Endpoint(blob.registry, "", "", False, blob.registry))
        found.sort(key=lambda e: e.name == avoid)
        return found

    def _with_retries(
        self,
        blob: BlobLocation,
        what: str,
        headers: dict[str, str],
        take: _Taker,
        limit: int,
        avoid: str,
        kind: str = "blobs",
    ) -> tuple[bytes | bytearray, str]:
        suffix = f"{kind}/{blob.digest}"
        errors: list[str] = []
        with self._lock:
            failing = self._failing.get(blob.registry, 0.0) > time.monotonic()
        attempts = 1 if failing else max(1, self.settings.retries + 1)
        ranged = "Range" in headers and kind == "blobs"  # a chunk range, not a whole table
        for attempt in range(attempts):
            for endpoint in self._endpoints(blob, avoid, ranged):
                started = time.monotonic()
                try:
                    reply = self._get(endpoint, blob.repo, suffix, headers, limit)
                    data = take(reply)
                except _Skip as err:
                    errors.append(f"{endpoint.name}: {err}")
                    with self._lock:
                        now = time.monotonic()
                        self._filling = {k: t for k, t in self._filling.items() if t > now}
                        self._filling[(endpoint.name, blob.digest)] = now + err.seconds
                    continue
                except _Retryable as err:
                    metrics.REGISTRY_ERRORS.labels(err.status).inc()
                    errors.append(f"{endpoint.name}: {err}")
                    self._rest(endpoint, err)
                    continue
                except (_Final, AuthError) as err:
                    if isinstance(err, _Final):  # an AuthError here is the local auth file's
                        metrics.REGISTRY_ERRORS.labels(err.status).inc()
                    if endpoint.mirror:
                        errors.append(f"{endpoint.name}: {err}")
                        self._rest(endpoint, err)
                        continue
                    raise FetchError(f"{what}: {err}") from None
                counter = "bytes_fetched" if ranged else "table_bytes_fetched"
                if kind == "manifests":
                    counter = "manifest_bytes_fetched"
                    metrics.FETCHED_MANIFEST_BYTES.inc(len(data))
                elif ranged and endpoint.peer:
                    metrics.PEER_FETCHED_BYTES.inc(len(data))
                elif ranged:
                    metrics.FETCHED_LAYER_BYTES.inc(len(data))
                    metrics.REGISTRY_FETCH_SECONDS.observe(time.monotonic() - started)
                else:
                    metrics.FETCHED_TABLE_BYTES.inc(len(data))
                self.counters.add(counter, len(data))
                self.counters.add("fetch_requests")
                if endpoint.peer and ranged:
                    self.counters.add("bytes_from_peers", len(data))
                elif endpoint.mirror and ranged:
                    self.counters.add("bytes_from_mirrors", len(data))
                with self._lock:
                    self._failing.pop(blob.registry, None)
                return data, endpoint.name
            if attempt + 1 < attempts:
                self.counters.add("fetch_retries")
                delay = min(self.settings.backoff * 2**attempt, self.settings.backoff_max)
                log.warning("%s: %s; trying again in %.2fs", what, errors[-1], delay)
                time.sleep(delay)
        self.counters.add("fetch_errors")
        with self._lock:
            self._failing[blob.registry] = time.monotonic() + FAIL_FAST_SECONDS
        if failing:
            tries = f"failed (one try: every try failed less than {FAIL_FAST_SECONDS:g}s ago)"
        else:
            tries = f"failed {attempts} time{'s' if attempts > 1 else ''}"
        raise FetchError(f"{what}: {tries}; last: {errors[-1]}")

    def _rest(self, endpoint: _Endpoint, why: object = "") -> None:
        if endpoint.mirror:
            with self._lock:
                now = time.monotonic()
                was_resting = self._resting.get(endpoint.name, 0.0) > now
                self._resting[endpoint.name] = now + MIRROR_REST_SECONDS
            if not was_resting:
                reason = " ".join(str(why).split())[:300] or "bad data"
                log.warning(
                    "%s %s failed (%s): reads go to the next mirror or the origin for %gs",
                    "peer" if endpoint.peer else "mirror",
                    endpoint.name,
                    reason,
                    MIRROR_REST_SECONDS,
                )

    # -- one request, through the endpoint's session -------------------------------------

    def _session(self, endpoint: _Endpoint, repo: str) -> RegistrySession:
        """The session of (endpoint, repository): its token and learned scheme stay there."""
        key = (endpoint.name, endpoint.query, repo)
        with self._lock:
            session = self._sessions.get(key)
        if session is not None:
            return session
        host = endpoint.credentials_host
        session = RegistrySession(
            endpoint.name,
            repo,
            insecure=self._insecure(endpoint.name),
            find_credentials=lambda: self._credentials(host),
            connections=self._connections,
            mirror=Mirror(endpoint.base, endpoint.query) if endpoint.mirror else None,
            insecure_host=self._insecure,
        )
        with self._lock:
            return self._sessions.setdefault(key, session)

    def _get(
        self, endpoint: _Endpoint, repo: str, suffix: str, headers: dict[str, str], limit: int
    ) -> _Reply:
        session = self._session(endpoint, repo)
        try:
            resp = session.request("GET", session.repo_url(suffix), headers=headers)
        except AuthError as err:
            if isinstance(err.__cause__, RegistryError):  # the token server did not answer
                raise _Retryable(str(err), metrics.STATUS_NO_ANSWER) from None
            if err.status:
                raise _Final(str(err), err.status) from None
            raise  # the local auth file
        except RegistryError as err:
            raise _Retryable(str(err), metrics.STATUS_NO_ANSWER) from None
        with resp:
            if resp.status == 200 and "Range" in headers and endpoint.mirror:
                # A pull-through cache answers a blob it does not hold yet whole, while it
                # fetches it in the background: not read (it may be gigabytes), and the
                # mirror is not rested; its cached copy serves ranges soon after.
                raise _Skip(
                    "sent the whole blob (Range ignored: not cached there yet)",
                    MIRROR_FILLING_SECONDS,
                )
            if resp.status == 404 and endpoint.peer:
                raise _Skip("does not hold it", PEER_MISS_SECONDS)
            try:
                body, complete = resp.take(limit if resp.status < 400 else 1 << 16)
            except (OSError, http.client.HTTPException) as err:
                why = str(err) or type(err).__name__
                raise _Retryable(f"reading the answer: {why}", metrics.STATUS_NO_ANSWER) from None
        status = str(resp.status)
        if resp.status == 401:
            raise _Final(f"access denied ({error_text(401, body)})", status)
        if resp.status == 429 or resp.status >= 500:
            raise _Retryable(error_text(resp.status, body), status)
        if resp.status == 404:
            raise _Final(f"not found ({error_text(404, body)})", status)
        if resp.status >= 400:
            raise _Final(error_text(resp.status, body), status)
        return _Reply(resp.status, resp.headers, body, complete)

    def _insecure(self, host: str) -> bool:
        return host in self.settings.insecure or is_loopback(host)

    # -- auth -----------------------------------------------------------------------------

    def _credentials(self, host: str) -> Credentials | None:
        path = self.settings.auth_file
        if path is None or not path.is_file():
            return None
        return find_credentials(host, path)


def _whole(limit: int) -> _Taker:
    """Takes a whole 200 body of at most `limit` bytes."""

    def take(reply: _Reply) -> bytes | bytearray:
        if reply.status != 200:
            raise _Final(f"HTTP {reply.status} instead of 200")
        if not reply.complete:
            raise _Final(f"more than {limit} bytes")
        return reply.body

    return take


def _range_body(reply: _Reply, start: int, end: int) -> bytes | bytearray:
    want = end - start
    if reply.status == 206:
        match = _CONTENT_RANGE.fullmatch(reply.headers.get("content-range", "").strip())
        if not match or (int(match.group(1)), int(match.group(2))) != (start, end - 1):
            raise _Retryable(f"wrong Content-Range {reply.headers.get('content-range')!r}")
        if len(reply.body) != want or not reply.complete:
            raise _Retryable(f"{len(reply.body)} bytes instead of {want}")
        return reply.body
    if reply.status == 200:  # the server ignored Range: take our part of the whole blob
        if len(reply.body) < end:
            raise _Final(f"whole blob of {len(reply.body)} bytes ends before {end}")
        return reply.body[start:end]
    raise _Final(f"HTTP {reply.status} instead of 206")
