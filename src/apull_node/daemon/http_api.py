"""apulld's HTTP API on a unix socket (what the snapshotter calls).

PUT|GET    /v1.0/apulld/ping         -> 200 {"status":"ok","backend",...,"serving":{...}}
PUT        /v1.0/apulld/blob_config  -> 201 the stored blob (JSON body: see blob_registry);
                                        file backend: also "path", the blob's file; fscache:
                                        "mount_options" (fsid=<blob_id>[,domain_id=...])
GET        /v1.0/apulld/blob_config  -> 200 {"blobs":[...]}
DELETE     /v1.0/apulld/blob_config?blob_id=ID -> 204, 404 when unknown
PUT        /v1.0/apulld/prefetch     -> 202 {"started": true|false} (JSON body: registry,
                                        repo, manifest digest, optionally manifest_data: its
                                        bytes, base64): warm the image's layers in the
                                        background (image_warmup.py); "started" false when it
                                        was warmed moments ago or prefetch is off
PUT        /v1.0/apulld/warm         -> 202 {"started": bool, "image": progress} (JSON body: the
                                        prefetch fields, "whole": bool (default true),
                                        "startup": {layer digest: [[offset, length], ...]}):
                                        prewarm the image (image_prewarm.py), start-up set first;
                                        "started" false when its job is running already
GET        /v1.0/apulld/warm[?manifest=DIGEST[&registry=R&repo=P]] -> 200 {"images":
                                        [progress, ...]}: state (warming, warm, failed), error,
                                        bytes, cached, the start-up set's bytes and cached, per
                                        layer; with registry and repo, an image never prewarmed
                                        here is surveyed (state "": what the cache holds now)
GET        /v1.0/apulld/startup[?registry=R&repo=P&manifest=D] -> 200 {"layers": {blob
                                        digest: [[offset, length], ...]}}: what each blob's
                                        first minute of reads asked for (startup_reads.py), the
                                        start-up sets prewarm uses; of one image's layers
Errors are JSON {"error": "..."}: 400 bad request, 404 unknown path/blob, 405 wrong method,
409 the blob is in use (open or mounted) and cannot be removed or replaced.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Optional, Protocol
from urllib.parse import parse_qs, urlsplit

from apull_node import __version__
from apull_node.daemon.backend import BackendChoice
from apull_node.daemon.blob_registry import (
    BlobConfig,
    BlobConfigError,
    BlobRegistry,
    BlobStoreError,
    parse_blob_config,
    parse_prefetch_request,
    parse_warm_request,
)
from apull_node.daemon.image_prewarm import ImagePrewarm, PrewarmBusyError
from apull_node.daemon.image_warmup import ImageWarmup
from apull_node.daemon.registry_fetch import MAX_MANIFEST, BlobLocation
from apull_node.daemon.startup_reads import StartupReads

PING_PATH = "/v1.0/apulld/ping"
BLOB_CONFIG_PATH = "/v1.0/apulld/blob_config"
PREFETCH_PATH = "/v1.0/apulld/prefetch"
WARM_PATH = "/v1.0/apulld/warm"
STARTUP_PATH = "/v1.0/apulld/startup"
MAX_BODY = 64 * 1024
#: A warm request may carry a start-up set of many ranges.
MAX_WARM_BODY = 2 << 20
log = logging.getLogger("apulld.api")


class ServingError(Exception):
    """A serving backend refuses a blob change; `status` is the HTTP answer."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Serving(Protocol):
    """What serves blob data (the file or fscache backend), told about blob config changes."""

    def check_put(self, config: BlobConfig) -> None:
        """Raise ServingError when the blob cannot be added or replaced now."""

    def added(self, config: BlobConfig) -> dict[str, Any]:
        """The blob was stored; extra fields for the answer."""

    def check_delete(self, blob_id: str) -> None:
        """Raise ServingError when the blob cannot be removed now."""

    def removed(self, blob_id: str) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What ping reports under "serving"."""


@dataclass
class ApiState:
    backend: BackendChoice
    blobs: BlobRegistry
    serving: Serving | None = None
    #: Image warm-ups (None: prefetch_enable is off or nothing serves blobs).
    warmup: ImageWarmup | None = None
    #: Prewarms asked by operators (None: nothing serves blobs).
    prewarm: ImagePrewarm | None = None
    #: What images read when they started here (None: nothing serves blobs).
    startup: StartupReads | None = None


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


Reply = tuple[HTTPStatus, Optional[dict[str, Any]]]


class ApulldHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: str, state: ApiState) -> None:
        self.state = state
        super().__init__(address, ApiHandler)


class ApiHandler(BaseHTTPRequestHandler):
    server: ApulldHttpServer
    protocol_version = "HTTP/1.1"
    server_version = f"apulld/{__version__}"
    # A client that stops talking mid-request frees its thread after this many seconds.
    timeout = 30
    _allow = ""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _routes(self) -> dict[str, dict[str, Callable[[], Reply]]]:
        return {
            PING_PATH: {"GET": self._ping, "PUT": self._ping},
            BLOB_CONFIG_PATH: {
                "GET": self._list_blobs,
                "PUT": self._put_blob,
                "DELETE": self._delete_blob,
            },
            PREFETCH_PATH: {"PUT": self._prefetch},
            WARM_PATH: {"PUT": self._warm, "GET": self._warm_progress},
            STARTUP_PATH: {"GET": self._startup},
        }

    def _dispatch(self, method: str) -> None:
        self._url = urlsplit(self.path)
        try:
            self._body = self._read_body()
            handlers = self._routes().get(self._url.path)
            if handlers is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such path: {self._url.path}")
            handler = handlers.get(method)
            if handler is None:
                self._allow = ", ".join(sorted(handlers))
                raise ApiError(
                    HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed (allowed: {self._allow})"
                )
            status, payload = handler()
        except ApiError as err:
            status, payload = err.status, {"error": str(err)}
        except Exception as err:
            log.exception("%s %s failed", method, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {err}"}
        self._reply(status, payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the body with Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        limit = MAX_WARM_BODY if self._url.path == WARM_PATH else MAX_BODY
        if length < 0 or length > limit:
            self.close_connection = True
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
        return self.rfile.read(length) if length else b""

    def _reply(self, status: HTTPStatus, payload: dict[str, Any] | None) -> None:
        self.send_response(status)
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", self._allow)
        if payload is None:
            self.end_headers()
            return
        data = json.dumps(payload).encode() + b"\n"
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # Handlers.

    def _ping(self) -> Reply:
        state = self.server.state
        answer: dict[str, Any] = {
            "status": "ok",
            "backend": state.backend.name,
            "reasons": state.backend.reasons,
            "version": __version__,
            "pid": os.getpid(),
            "blobs": len(state.blobs),
        }
        if state.serving is not None:
            answer["serving"] = state.serving.describe()
        return HTTPStatus.OK, answer

    def _list_blobs(self) -> Reply:
        return HTTPStatus.OK, {"blobs": [blob.to_json() for blob in self.server.state.blobs.all()]}

    def _put_blob(self) -> Reply:
        try:
            raw = json.loads(self._body)
        except ValueError as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"body: not JSON: {err}") from None
        try:
            config = parse_blob_config(raw)
        except BlobConfigError as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        serving = self.server.state.serving
        extra: dict[str, Any] = {}
        try:
            if serving is not None:
                serving.check_put(config)
            created = self.server.state.blobs.put(config)
            if serving is not None:
                extra = serving.added(config)
        except ServingError as err:
            raise ApiError(err.status, str(err)) from None
        except BlobStoreError as err:
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, str(err)) from None
        log.info("blob %s %s", config.blob_id, "added" if created else "replaced")
        answer = {**config.to_json(), **extra, "created": created}
        return HTTPStatus.CREATED, {**answer, "backend": self.server.state.backend.name}

    def _prefetch(self) -> Reply:
        try:
            asked = parse_prefetch_request(json.loads(self._body), MAX_MANIFEST)
        except ValueError as err:  # BlobConfigError too
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        warmup = self.server.state.warmup
        where = BlobLocation(asked.registry, asked.repo, asked.manifest)
        started = warmup is not None and warmup.request(where, asked.manifest_data)
        return HTTPStatus.ACCEPTED, {"started": started}

    def _prewarm(self) -> ImagePrewarm:
        prewarm = self.server.state.prewarm
        if prewarm is None:
            raise ApiError(HTTPStatus.CONFLICT, "no backend serves blobs: nothing to warm")
        return prewarm

    def _warm(self) -> Reply:
        try:
            asked = parse_warm_request(json.loads(self._body), MAX_MANIFEST)
        except ValueError as err:  # BlobConfigError too
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        image = asked.image
        where = BlobLocation(image.registry, image.repo, image.manifest)
        prewarm = self._prewarm()
        try:
            _, started = prewarm.request(where, image.manifest_data, asked.whole, asked.startup)
        except PrewarmBusyError as err:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(err)) from None
        log.info("prewarm of %s %s", where, "started" if started else "already running")
        progress = prewarm.jobs(image.manifest)
        return HTTPStatus.ACCEPTED, {"started": started, "image": progress[0] if progress else {}}

    def _image_query(self) -> BlobLocation | None:
        """registry, repo and manifest from the query string: all three, or the manifest
        alone (repo and registry empty), or none."""
        query = parse_qs(self._url.query)
        for name, values in query.items():
            if len(values) > 1:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"{name}: at most once in the query string")
        found = {name: values[0] for name, values in query.items()}
        if not found.get("manifest"):
            return None
        return BlobLocation(found.get("registry", ""), found.get("repo", ""), found["manifest"])

    def _located(self, where: BlobLocation) -> BlobLocation:
        try:
            image = parse_prefetch_request(
                {"registry": where.registry, "repo": where.repo, "manifest": where.digest}, 0
            )
        except ValueError as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return BlobLocation(image.registry, image.repo, image.manifest)

    def _warm_progress(self) -> Reply:
        where = self._image_query()
        prewarm = self._prewarm()
        images = prewarm.jobs(where.digest if where else "")
        if not images and where is not None and where.registry:
            # No prewarm of it here (check mode): what the cache holds of it now.
            images = [prewarm.survey(self._located(where))]
        return HTTPStatus.OK, {"images": images}

    def _startup(self) -> Reply:
        startup = self.server.state.startup
        layers = startup.sets() if startup is not None else {}
        where = self._image_query()
        if where is not None:  # the image's layers only
            keep = self._prewarm().layer_digests(self._located(where))
            layers = {digest: ranges for digest, ranges in layers.items() if digest in keep}
        return HTTPStatus.OK, {"layers": layers}

    def _delete_blob(self) -> Reply:
        values = parse_qs(self._url.query).get("blob_id", [])
        if len(values) != 1 or not values[0]:
            raise ApiError(HTTPStatus.BAD_REQUEST, "blob_id: required once in the query string")
        serving = self.server.state.serving
        try:
            if serving is not None:
                serving.check_delete(values[0])
            deleted = self.server.state.blobs.delete(values[0])
        except ServingError as err:
            raise ApiError(err.status, str(err)) from None
        except BlobStoreError as err:
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, str(err)) from None
        if not deleted:
            raise ApiError(HTTPStatus.NOT_FOUND, f"blob_id: no blob {values[0]!r}")
        if serving is not None:
            serving.removed(values[0])
        log.info("blob %s deleted", values[0])
        return HTTPStatus.NO_CONTENT, None

    # http.server logs to stderr with a client address; a unix socket has none.

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)
