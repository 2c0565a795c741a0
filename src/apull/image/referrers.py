"""Keep chunk tables referenced: an OCI 1.1 referrer manifest listing them for the image.

Registries garbage-collect blobs no manifest references, and an annotation is not a
reference. So the converter pushes one artifact manifest (``artifactType``
CHUNK_TABLES_ARTIFACT_TYPE, the empty config, the tables as its layers, ``subject`` the
converted image). Registries with the referrers API index it themselves (they answer the
push with an ``OCI-Subject`` header); for the others it is added to the image index at the
fallback tag ``sha256-<hex of the image digest>``, as the distribution spec prescribes
(other referrers already listed there, e.g. signatures, are kept).
"""

from __future__ import annotations

from apull.image.registry_write import push_blob_bytes, push_manifest
from apull_node.image.format import CHUNK_TABLES_ARTIFACT_TYPE, FORMAT_VERSION, IMAGE_FORMAT_VERSION
from apull_node.image.oci import (
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    canonical_json,
    load_json_object,
    parse_index,
    sha256_digest,
)
from apull_node.image.registry_session import RegistryError, RegistrySession, error_text


def fallback_tag(digest: str) -> str:
    return digest.replace(":", "-", 1)


def chunk_tables_manifest(subject: Descriptor, tables: list[Descriptor]) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": CHUNK_TABLES_ARTIFACT_TYPE,
        "config": Descriptor(OCI_EMPTY, sha256_digest(EMPTY_JSON), len(EMPTY_JSON)).to_json(),
        "layers": [table.to_json() for table in tables],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json(),
        "annotations": {IMAGE_FORMAT_VERSION: FORMAT_VERSION},
    }
    return canonical_json(document)


def _current_index(session: RegistrySession, tag: str) -> bytes | None:
    url = session.repo_url(f"manifests/{tag}")
    with session.request("GET", url, headers={"Accept": OCI_INDEX}) as resp:
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise RegistryError(f"GET {url}: {error_text(resp.status, resp.read(4096))}")
        return resp.read(4 << 20)


def merged_index(current: bytes | None, entry: Descriptor, tag: str) -> bytes:
    """The fallback-tag index with `entry` in it, replacing older chunk-table entries."""
    kept: list[Descriptor] = []
    if current is not None:
        what = f"referrers index {tag}"
        if load_json_object(current, what).get("mediaType") != OCI_INDEX:
            raise ManifestError(f"{what}: the tag holds something other than an image index")
        kept = [
            m
            for m in parse_index(current, what)
            if m.artifact_type != CHUNK_TABLES_ARTIFACT_TYPE or m.digest == entry.digest
        ]
    if all(m.digest != entry.digest for m in kept):
        kept.append(entry)
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [m.to_json() for m in kept],
    }
    return canonical_json(document)


def push_chunk_tables(
    session: RegistrySession, subject: Descriptor, tables: list[Descriptor]
) -> str:
    """Push the referrer manifest (and the fallback-tag index if needed); return its digest."""
    push_blob_bytes(session, EMPTY_JSON)
    raw = chunk_tables_manifest(subject, tables)
    digest, headers = push_manifest(session, sha256_digest(raw), raw, OCI_MANIFEST)
    if headers.get("oci-subject") == subject.digest:
        return digest
    tag = fallback_tag(subject.digest)
    entry = Descriptor(OCI_MANIFEST, digest, len(raw), artifact_type=CHUNK_TABLES_ARTIFACT_TYPE)
    current = _current_index(session, tag)
    index = merged_index(current, entry, tag)
    if index != current:
        push_manifest(session, tag, index, OCI_INDEX)
    return digest
