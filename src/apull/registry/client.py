"""A small registry v2 client: enough to push and inspect images without other tools.

Plain HTTP only for now (the lab registry); token auth and TLS arrive with image conversion.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from apull_node.image.oci import sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


class RegistryError(RuntimeError):
    """The registry answered something we did not expect."""


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


class RegistryClient:
    """Client for one registry at host:port over plain HTTP."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.address, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        except OSError as exc:
            raise RegistryError(f"registry {self.address}: {method} {path}: {exc}") from exc
        finally:
            conn.close()

    def ping(self) -> bool:
        try:
            status, _, _ = self._request("GET", "/v2/")
        except RegistryError:
            return False
        return status == 200

    def has_blob(self, repo: str, digest: str) -> bool:
        status, _, _ = self._request("HEAD", f"/v2/{repo}/blobs/{digest}")
        return status == 200

    def push_blob(self, repo: str, blob: Blob) -> None:
        if self.has_blob(repo, blob.digest):
            return
        status, headers, body = self._request("POST", f"/v2/{repo}/blobs/uploads/")
        if status != 202 or "location" not in headers:
            raise RegistryError(f"start upload to {repo}: HTTP {status} {body[:200]!r}")
        location = urlsplit(headers["location"])
        sep = "&" if location.query else "?"
        path = f"{location.path}?{location.query}{sep}digest={blob.digest}".replace("?&", "?")
        status, _, body = self._request(
            "PUT",
            path,
            body=blob.data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if status != 201:
            raise RegistryError(f"upload {blob.digest} to {repo}: HTTP {status} {body[:200]!r}")

    def push_manifest(self, repo: str, tag: str, manifest: bytes, media_type: str) -> str:
        status, _, body = self._request(
            "PUT",
            f"/v2/{repo}/manifests/{tag}",
            body=manifest,
            headers={"Content-Type": media_type},
        )
        if status != 201:
            raise RegistryError(f"push manifest {repo}:{tag}: HTTP {status} {body[:200]!r}")
        return sha256_digest(manifest)

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        status, headers, _ = self._request(
            "HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
        )
        if status != 200:
            return None
        return headers.get("docker-content-digest")

    def manifest(self, repo: str, tag: str) -> dict[str, Any]:
        """The OCI manifest behind repo:tag, decoded."""
        status, _, body = self._request(
            "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
        )
        if status != 200:
            raise RegistryError(f"manifest {repo}:{tag}: HTTP {status} {body[:200]!r}")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise RegistryError(f"manifest {repo}:{tag}: not a JSON object")
        return document

    def push_image(self, repo: str, tag: str, config: Blob, layers: list[Blob]) -> str:
        """Push layers, config and an OCI manifest; return the manifest digest."""
        for blob in [*layers, config]:
            self.push_blob(repo, blob)
        return self.push_manifest(repo, tag, image_manifest(config, layers), OCI_MANIFEST)

    def push_index(self, repo: str, tag: str, images: list[tuple[str, bytes]]) -> str:
        """Push an OCI index of manifests already pushed, each given as (architecture, its
        bytes), all for linux; return the index's digest."""
        entries = [
            {"mediaType": OCI_MANIFEST, "digest": sha256_digest(raw), "size": len(raw),
             "platform": {"architecture": arch, "os": "linux"}}
            for arch, raw in images
        ]  # fmt: skip
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        raw = json.dumps(index, separators=(",", ":"), sort_keys=True).encode()
        return self.push_manifest(repo, tag, raw, OCI_INDEX)


def image_manifest(config: Blob, layers: list[Blob]) -> bytes:
    """The canonical OCI manifest of a config and its layers."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
