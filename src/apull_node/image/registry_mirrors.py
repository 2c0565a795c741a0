"""Registry mirrors as the suite names them once: ``URL`` or ``REGISTRY=URL`` entries.

A bare URL mirrors every registry; ``REGISTRY=URL`` only that registry (HOST or HOST:PORT,
``docker.io`` for Docker Hub). apulld tries the mirrors of a blob's registry before the
origin; the containerd role writes the same list into containerd's hosts.toml files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# A registry as image references name it: a host name or IPv4 address, an optional port.
REGISTRY_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?")
# A mirror: scheme, host (a name, IPv4 or [IPv6]), optional port and path. No user or password
# (neither containerd nor apulld would use them, and they would land in files and logs), no
# query, and nothing a TOML string or a log line would have to escape.
_MIRROR_URL = re.compile(
    r"https?://([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
    r"(/[A-Za-z0-9._~/-]*)?"
)


@dataclass(frozen=True)
class Mirror:
    url: str  # scheme://host[:port][/prefix], without a trailing slash
    registry: str = ""  # only for this registry; "" for all

    def serves(self, registry: str) -> bool:
        return not self.registry or self.registry == registry


def parse_mirrors(entries: Iterable[str]) -> tuple[Mirror, ...]:
    """The mirrors of ``URL`` / ``REGISTRY=URL`` entries, in order; ValueError names a bad one."""
    mirrors: list[Mirror] = []
    for item in (str(part).strip() for part in entries):
        if not item:
            continue
        registry, sep, url = item.partition("=")
        if not sep:
            registry, url = "", item
        registry, url = registry.strip(), url.strip()
        if "@" in url:
            raise ValueError(
                "mirror with a user or password in its URL: name the mirror without them "
                "(registry credentials belong in the auth file)"
            )
        if not _MIRROR_URL.fullmatch(url):
            raise ValueError(f"mirror {item!r}: expected [REGISTRY=]http(s)://host[:port][/path]")
        if sep and not REGISTRY_NAME.fullmatch(registry):
            raise ValueError(f"mirror {item!r}: {registry!r} is not a registry (HOST[:PORT])")
        mirror = Mirror(url.rstrip("/"), registry)
        if mirror not in mirrors:
            mirrors.append(mirror)
    return tuple(mirrors)
