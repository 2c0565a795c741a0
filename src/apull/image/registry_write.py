"""Writing images: blobs (skipped when the registry has them) and manifests."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from apull_node.image.oci import sha256_digest
from apull_node.image.registry_session import Body, RegistryError, RegistrySession, error_text


def has_blob(session: RegistrySession, digest: str) -> bool:
    url = session.repo_url(f"blobs/{digest}")
    with session.request("HEAD", url) as resp:
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise RegistryError(f"HEAD {url}: {error_text(resp.status, b'')}")


def _upload(session: RegistrySession, digest: str, size: int, body: Body) -> None:
    start = session.repo_url("blobs/uploads/")
    with session.request("POST", start, headers={"Content-Length": "0"}) as resp:
        location = resp.headers.get("location", "")
        if resp.status != 202 or not location:
            raise RegistryError(f"POST {start}: {error_text(resp.status, resp.read(4096))}")
    parts = urlsplit(urljoin(start, location))
    query = parts.query + ("&" if parts.query else "") + urlencode({"digest": digest})
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    with session.request("PUT", url, headers=headers, body=body) as resp:
        if resp.status != 201:
            raise RegistryError(
                f"PUT {parts.path} (blob {digest}): {error_text(resp.status, resp.read(4096))}"
            )


def push_blob_file(session: RegistrySession, path: Path, digest: str, size: int) -> bool:
    """Upload the file as blob `digest` unless the registry has it; True if uploaded."""
    if has_blob(session, digest):
        return False
    with open(path, "rb") as body:
        _upload(session, digest, size, body)
    return True


def push_blob_bytes(session: RegistrySession, data: bytes) -> bool:
    """Upload `data` unless the registry has it; True if uploaded."""
    digest = sha256_digest(data)
    if has_blob(session, digest):
        return False
    _upload(session, digest, len(data), data)
    return True


def push_manifest(
    session: RegistrySession, reference: str, raw: bytes, media_type: str
) -> tuple[str, dict[str, str]]:
    """PUT a manifest at a tag (or its digest); return its digest and the response headers."""
    url = session.repo_url(f"manifests/{reference}")
    with session.request("PUT", url, headers={"Content-Type": media_type}, body=raw) as resp:
        if resp.status != 201:
            raise RegistryError(f"PUT {url}: {error_text(resp.status, resp.read(4096))}")
        headers = dict(resp.headers)
    digest = sha256_digest(raw)
    answered = headers.get("docker-content-digest")
    if answered and answered != digest:
        raise RegistryError(f"PUT {url}: registry says digest {answered}, we computed {digest}")
    return digest, headers
