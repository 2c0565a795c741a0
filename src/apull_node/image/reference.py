"""Image references: ``[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`` with Docker's defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
#: Where Docker Hub's registry API really lives.
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)


class ImageRefError(ValueError):
    """An image reference does not parse; the message names it."""


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def endpoint(self) -> str:
        """host[:port] to talk to (Docker Hub's API is not at docker.io)."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes into /v2/<repo>/manifests/<reference>: the digest, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> str:
        return f"{self.registry}/{self.repository}@{digest}"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageRef:
    """Parse like docker does: the first part is a registry if it has '.', ':' or is localhost."""
    original = text
    if not text or text != text.strip():
        raise ImageRefError(f"image reference {original!r}: empty or has spaces")
    digest = ""
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ImageRefError(f"image reference {original!r}: bad digest {digest!r}")
    registry = DOCKER_HUB
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _HOST.fullmatch(first):
            raise ImageRefError(f"image reference {original!r}: bad registry {first!r}")
        registry, text = first, rest
    tag = ""
    name, colon, maybe_tag = text.rpartition(":")
    if colon and "/" not in maybe_tag:
        text, tag = name, maybe_tag
        if not _TAG.fullmatch(tag):
            raise ImageRefError(f"image reference {original!r}: bad tag {tag!r}")
    if registry in (DOCKER_HUB, "index.docker.io", DOCKER_HUB_ENDPOINT):
        registry = DOCKER_HUB
        if "/" not in text:
            text = f"library/{text}"
    if not _REPOSITORY.fullmatch(text):
        raise ImageRefError(
            f"image reference {original!r}: bad repository {text!r} "
            "(lower-case letters, digits and . _ - separators)"
        )
    if not tag and not digest:
        tag = DEFAULT_TAG
    return ImageRef(registry=registry, repository=text, tag=tag, digest=digest)
