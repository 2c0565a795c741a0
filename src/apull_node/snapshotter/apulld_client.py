"""A small client for apulld's HTTP API on its unix socket (see apull_node.daemon.http_api).

The snapshotter uses PUT blob_config (register a layer blob; the answer names the backend,
and the file backend's the blob's file), ping (why no backend serves blobs), PUT prefetch
(warm an image's layers), GET blob_config (what is registered) and DELETE blob_config; the
prewarm command PUT and GET warm.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
from typing import Any
from urllib.parse import urlencode

log = logging.getLogger("apull-snapshotter.apulld-client")

PING_PATH = "/v1.0/apulld/ping"
BLOB_CONFIG_PATH = "/v1.0/apulld/blob_config"
PREFETCH_PATH = "/v1.0/apulld/prefetch"
WARM_PATH = "/v1.0/apulld/warm"
STARTUP_PATH = "/v1.0/apulld/startup"
#: Seconds for connecting and for each answer; apulld answers from memory.
DEFAULT_TIMEOUT = 30.0


class ApulldError(Exception):
    """apulld cannot be reached or refused a call; the message names the socket."""


class ApulldUnreachableError(ApulldError):
    """No answer on the socket (apulld not running, socket missing, timeout)."""


class ApulldRefusedError(ApulldError):
    """apulld answered with an error status; `status` and apulld's own message."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("apulld", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApulldClient:
    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout

    def ping(self) -> dict[str, Any]:
        """apulld's status: "backend" (fscache | file | none), "reasons", ..."""
        return self._call("PUT", PING_PATH)[1]

    def put_blob(self, config: dict[str, Any]) -> dict[str, Any]:
        """Register (or re-register) a blob; the answer has "path" with the file backend."""
        return self._call("PUT", BLOB_CONFIG_PATH, config)[1]

    def prefetch(
        self, registry: str, repo: str, manifest: str, manifest_data: bytes | None = None
    ) -> bool:
        """Ask apulld to warm an image's layers in the background (with the manifest's bytes
        when we have them: apulld need not fetch it); True when it started."""
        body = {"registry": registry, "repo": repo, "manifest": manifest}
        if manifest_data is not None:
            body["manifest_data"] = base64.b64encode(manifest_data).decode()
        try:
            return bool(self._call("PUT", PREFETCH_PATH, body)[1].get("started"))
        except ApulldRefusedError as err:
            # An apulld older than this snapshotter (a node half-way through an upgrade)
            # knows no manifest_data: ask again without it; it fetches the manifest itself.
            if "manifest_data" not in body or err.status != 400 or "unknown field" not in str(err):
                raise
            log.info("%s; asking again without the manifest's bytes", err)
            del body["manifest_data"]
            return bool(self._call("PUT", PREFETCH_PATH, body)[1].get("started"))

    def warm(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a prewarm (see http_api: registry, repo, manifest, whole, startup); the
        answer says whether it started and where it stands."""
        return self._call("PUT", WARM_PATH, body)[1]

    def warm_progress(self, manifest: str, registry: str = "", repo: str = "") -> dict[str, Any]:
        """Where the prewarm of the image stands; with registry and repo, for an image
        never prewarmed here, what the cache holds of it (state ""); else {} for none."""
        query = {"manifest": manifest, **({"registry": registry, "repo": repo} if repo else {})}
        images = self._call("GET", f"{WARM_PATH}?{urlencode(query)}")[1]
        found = images.get("images") or [{}]
        return found[0] if isinstance(found[0], dict) else {}

    def startup_sets(
        self, registry: str = "", repo: str = "", manifest: str = ""
    ) -> dict[str, Any]:
        """What images read when they started on this node: {"layers": {digest: ranges}};
        of one image's layers when it is named."""
        query = f"?{urlencode({'registry': registry, 'repo': repo, 'manifest': manifest})}"
        return self._call("GET", STARTUP_PATH + (query if manifest else ""))[1]

    def blob_ids(self) -> list[str]:
        """The blob_ids apulld has registered."""
        blobs = self._call("GET", BLOB_CONFIG_PATH)[1].get("blobs", [])
        return [b["blob_id"] for b in blobs if isinstance(b, dict) and "blob_id" in b]

    def delete_blob(self, blob_id: str) -> bool:
        """Forget a blob; False when apulld did not know it."""
        status, _ = self._call("DELETE", f"{BLOB_CONFIG_PATH}?{urlencode({'blob_id': blob_id})}",
                               expect_missing=True)  # fmt: skip
        return status != 404

    def _call(
        self, method: str, path: str, body: Any = None, expect_missing: bool = False
    ) -> tuple[int, dict[str, Any]]:
        what = f"apulld at {self.address}: {method} {path.split('?', 1)[0]}"
        conn = _UnixConnection(self.address, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            reply = conn.getresponse()
            raw = reply.read()
        except (OSError, http.client.HTTPException) as err:
            raise ApulldUnreachableError(f"{what}: no answer: {err or type(err).__name__}") from err
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"error": raw[:200].decode(errors="replace")}
        if not isinstance(payload, dict):
            payload = {"error": f"unexpected answer {payload!r}"}
        if reply.status == 404 and expect_missing:
            return reply.status, payload
        if reply.status >= 300:
            message = payload.get("error", reply.reason)
            raise ApulldRefusedError(f"{what}: {reply.status} {message}", reply.status)
        return reply.status, payload
