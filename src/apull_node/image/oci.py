"""OCI and Docker v2 image documents: media types, descriptors, manifests and indexes."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
#: Accept header for manifest requests, most wanted first.
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST))

#: Layer media types we can read (compression is detected from the bytes, not the name).
SOURCE_LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)

#: The empty JSON object blob `{}` that OCI artifacts use as their config.
EMPTY_JSON = b"{}"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest, index or config is malformed or unsupported; the message says why."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(document: object) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def check_digest(digest: object, what: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ManifestError(f"{what}: digest {digest!r} is not a sha256 digest")
    return digest


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    artifact_type: str = ""

    @classmethod
    def parse(cls, raw: object, what: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise ManifestError(f"{what}: descriptor is not an object")
        media_type = raw.get("mediaType", "")
        size = raw.get("size")
        if not isinstance(media_type, str):
            raise ManifestError(f"{what}: mediaType is not a string")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{what}: size {size!r} is not a byte count")
        annotations = raw.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise ManifestError(f"{what}: annotations are not a string map")
        platform = raw.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise ManifestError(f"{what}: platform is not an object")
        artifact_type = raw.get("artifactType", "")
        return cls(
            media_type=media_type,
            digest=check_digest(raw.get("digest"), what),
            size=size,
            annotations=dict(annotations),
            platform=platform,
            artifact_type=artifact_type if isinstance(artifact_type, str) else "",
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = dict(self.platform)
        return out


@dataclass(frozen=True)
class ImageManifest:
    """A single-platform image manifest (OCI or Docker v2 schema 2)."""

    media_type: str
    digest: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]


def load_json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what}: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ManifestError(f"{what}: not a JSON object")
    return document


def media_type_of(raw: bytes, header_type: str, what: str) -> str:
    """The document's mediaType field, else the Content-Type the registry sent."""
    document = load_json_object(raw, what)
    media_type = document.get("mediaType") or header_type.split(";")[0].strip()
    if not isinstance(media_type, str):
        raise ManifestError(f"{what}: mediaType is not a string")
    if not media_type and "manifests" in document:
        return OCI_INDEX
    if not media_type and "layers" in document:
        return OCI_MANIFEST
    return media_type


def parse_image_manifest(raw: bytes, media_type: str, what: str) -> ImageManifest:
    if media_type in DOCKER_SCHEMA1:
        raise ManifestError(f"{what}: Docker schema 1 manifests are not supported")
    if media_type not in IMAGE_MANIFESTS:
        raise ManifestError(f"{what}: {media_type!r} is not an image manifest")
    document = load_json_object(raw, what)
    if document.get("schemaVersion") != 2:
        raise ManifestError(f"{what}: schemaVersion is not 2")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ManifestError(f"{what}: layers is not a list")
    annotations = document.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestError(f"{what}: annotations is not an object")
    return ImageManifest(
        media_type=media_type,
        digest=sha256_digest(raw),
        raw=raw,
        config=Descriptor.parse(document.get("config"), f"{what}: config"),
        layers=tuple(
            Descriptor.parse(layer, f"{what}: layer {i + 1}") for i, layer in enumerate(layers)
        ),
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def parse_index(raw: bytes, what: str) -> list[Descriptor]:
    document = load_json_object(raw, what)
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise ManifestError(f"{what}: manifests is not a list")
    return [Descriptor.parse(m, f"{what}: manifest {i + 1}") for i, m in enumerate(manifests)]


def parse_platform(text: str) -> dict[str, str]:
    """Parse OS/ARCH[/VARIANT] into {"os": ..., "architecture": ...[, "variant": ...]}."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT")
    platform = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        platform["variant"] = parts[2]
    return platform


def pick_platform(manifests: list[Descriptor], want: dict[str, str], what: str) -> Descriptor:
    """The index entry for `want` (variant only compared when asked for)."""
    for entry in manifests:
        platform = entry.platform or {}
        if platform.get("os") != want["os"]:
            continue
        if platform.get("architecture") != want["architecture"]:
            continue
        if "variant" in want and platform.get("variant") != want["variant"]:
            continue
        if entry.media_type not in IMAGE_MANIFESTS:
            continue
        return entry
    seen = sorted(
        "/".join(str(v) for v in (p.get("os"), p.get("architecture"), p.get("variant")) if v)
        for p in (e.platform or {} for e in manifests)
    )
    wanted = "/".join(want.values())
    raise ManifestError(f"{what}: no image for {wanted} in the index (has: {', '.join(seen)})")


def config_diff_ids(raw: bytes, what: str) -> list[str]:
    """rootfs.diff_ids of an image config."""
    document = load_json_object(raw, what)
    rootfs = document.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ManifestError(f"{what}: rootfs.diff_ids is missing")
    return [check_digest(d, f"{what}: diff_id") for d in rootfs["diff_ids"]]
