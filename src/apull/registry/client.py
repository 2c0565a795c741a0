"""The lab's and the tests' view of one plain-HTTP registry: push and inspect images.

A thin layer over the product's one registry client (`registry_session.RegistrySession`,
with `registry_read` and `registry_write`): the same connections, auth and errors as apulld
and the converter, addressed by host:port and repository.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from apull.image.registry_read import MAX_MANIFEST_SIZE
from apull.image.registry_write import has_blob, push_blob_bytes, push_manifest
from apull_node.image.oci import sha256_digest
from apull_node.image.registry_connections import Connections
from apull_node.image.registry_session import RegistryError, RegistrySession, error_text

__all__ = ["RegistryError"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


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
    """One registry at host:port over plain HTTP (the lab's, a test's)."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._connections = Connections(timeout=timeout, connect_timeout=timeout)
        self._sessions: dict[str, RegistrySession] = {}

    def session(self, repo: str) -> RegistrySession:
        """The session for one repository (pull and push)."""
        session = self._sessions.get(repo)
        if session is None:
            session = self._sessions[repo] = RegistrySession(
                self.address,
                repo,
                insecure=True,
                push=True,
                connections=self._connections,
                scheme="http",
            )
        return session

    def ping(self) -> bool:
        session = self.session("")
        try:
            with session.request("GET", f"{session.base_url}/v2/") as resp:
                return resp.status == 200
        except RegistryError:
            return False

    def has_blob(self, repo: str, digest: str) -> bool:
        return has_blob(self.session(repo), digest)

    def push_blob(self, repo: str, blob: Blob) -> None:
        push_blob_bytes(self.session(repo), blob.data)

    def push_manifest(self, repo: str, tag: str, manifest: bytes, media_type: str) -> str:
        return push_manifest(self.session(repo), tag, manifest, media_type)[0]

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        session = self.session(repo)
        url = session.repo_url(f"manifests/{tag}")
        with session.request("HEAD", url, headers={"Accept": OCI_MANIFEST}) as resp:
            if resp.status != 200:
                return None
            return resp.headers.get("docker-content-digest")

    def manifest(self, repo: str, tag: str) -> dict[str, Any]:
        """The OCI manifest behind repo:tag, decoded."""
        session = self.session(repo)
        url = session.repo_url(f"manifests/{tag}")
        with session.request("GET", url, headers={"Accept": OCI_MANIFEST}) as resp:
            if resp.status != 200:
                raise RegistryError(
                    f"manifest {repo}:{tag}: " + error_text(resp.status, resp.read())
                )
            raw = resp.read(MAX_MANIFEST_SIZE)
        document = json.loads(raw)
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
