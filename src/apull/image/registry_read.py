"""Reading images: manifests (resolving an index to one platform), configs and layer blobs.

Everything fetched is checked against its digest (and size, where a descriptor gives it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from apull_node.image.oci import (
    DOCKER_SCHEMA1,
    INDEXES,
    MANIFEST_ACCEPT,
    Descriptor,
    ImageManifest,
    ManifestError,
    media_type_of,
    parse_image_manifest,
    parse_index,
    pick_platform,
    sha256_digest,
)
from apull_node.image.registry_session import RegistryError, RegistrySession, error_text

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 16 << 20


def fetch_manifest(session: RegistrySession, reference: str) -> tuple[bytes, str, str]:
    """(bytes, media type, digest) of the manifest or index at a tag or digest."""
    url = session.repo_url(f"manifests/{reference}")
    with session.request("GET", url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
        if resp.status != 200:
            raise RegistryError(f"GET {url}: {error_text(resp.status, resp.read(4096))}")
        raw = resp.read(MAX_MANIFEST_SIZE)
        header_type = resp.headers.get("content-type", "")
    digest = sha256_digest(raw)
    if reference.startswith("sha256:") and digest != reference:
        raise RegistryError(f"GET {url}: the manifest's digest is {digest}")
    return raw, media_type_of(raw, header_type, f"manifest {reference}"), digest


def resolve_image(
    session: RegistrySession, reference: str, platform: dict[str, str]
) -> tuple[ImageManifest, str]:
    """The image manifest for `platform` at `reference`; also the digest first found there
    (the index's, when it is one)."""
    raw, media_type, digest = fetch_manifest(session, reference)
    top_digest = digest
    what = f"{session.endpoint}/{session.repository}@{digest}"
    if media_type in DOCKER_SCHEMA1:
        raise ManifestError(f"{what}: Docker schema 1 manifests are not supported")
    if media_type in INDEXES:
        entry = pick_platform(parse_index(raw, what), platform, what)
        raw, media_type, digest = fetch_manifest(session, entry.digest)
        what = f"{session.endpoint}/{session.repository}@{digest}"
        if media_type in INDEXES:
            raise ManifestError(f"{what}: an index inside an index is not supported")
    return parse_image_manifest(raw, media_type, what), top_digest


def fetch_blob_bytes(
    session: RegistrySession, descriptor: Descriptor, limit: int = MAX_CONFIG_SIZE
) -> bytes:
    """A small blob (a config), checked against the descriptor."""
    if descriptor.size > limit:
        raise RegistryError(f"blob {descriptor.digest}: {descriptor.size} bytes, over {limit}")
    url = session.repo_url(f"blobs/{descriptor.digest}")
    with session.request("GET", url) as resp:
        if resp.status != 200:
            raise RegistryError(f"GET {url}: {error_text(resp.status, resp.read(4096))}")
        data = resp.read(limit)
    if len(data) != descriptor.size or sha256_digest(data) != descriptor.digest:
        raise RegistryError(
            f"GET {url}: got {len(data)} bytes with digest {sha256_digest(data)}, "
            f"expected {descriptor.size} bytes with {descriptor.digest}"
        )
    return data


def fetch_blob_to_file(
    session: RegistrySession,
    descriptor: Descriptor,
    path: Path,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stream a blob into `path` (replaced), checking size and digest."""
    url = session.repo_url(f"blobs/{descriptor.digest}")
    hasher = hashlib.sha256()
    size = 0
    with session.request("GET", url) as resp:
        if resp.status != 200:
            raise RegistryError(f"GET {url}: {error_text(resp.status, resp.read(4096))}")
        with open(path, "wb") as out:
            for chunk in resp.iter_body():
                size += len(chunk)
                if size > descriptor.size:
                    raise RegistryError(f"GET {url}: more than the {descriptor.size} bytes")
                hasher.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(size)
    digest = "sha256:" + hasher.hexdigest()
    if size != descriptor.size or digest != descriptor.digest:
        raise RegistryError(
            f"GET {url}: got {size} bytes with digest {digest}, "
            f"expected {descriptor.size} bytes with {descriptor.digest}"
        )
