"""containerd's hosts.toml files for the registries the suite names: plain-HTTP ones, mirrors.

containerd (CRI, and ``ctr --hosts-dir``) looks up a registry's settings in
``<config_path>/<host[:port]>/hosts.toml``, and in ``<config_path>/_default/hosts.toml`` for
a registry without its own directory. In such a file ``[host."URL"]`` entries are tried in
order for each request, and ``server`` (the origin) last: a mirror that fails sends that
request on to the next one, then to the origin.

From one mirror list (``URL`` for every registry, ``REGISTRY=URL`` for one) and the registries
CRI reaches over plain HTTP, `hosts_files` gives each directory's file. Every file starts with
`MANAGED_HEADER`, by which the role knows its own files from an operator's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from apull_node.image.registry_mirrors import REGISTRY_NAME, Mirror, parse_mirrors

DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
#: The directory whose hosts.toml serves every registry without one of its own.
EVERY_REGISTRY = "_default"
MANAGED_HEADER = "# Written by apull-deploy (roles/containerd) from its registry settings."
#: containerd reads `dial_timeout` in hosts.toml from 2.1 on (older releases ignore it).
DIAL_TIMEOUT_SINCE = (2, 1)
_DOCKER_HUB = "docker.io"


class RegistryHostsError(ValueError):
    """A registry or mirror setting that cannot become a hosts.toml; names the setting."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def registry_dirs(insecure: Iterable[str], mirrors: Sequence[Mirror]) -> list[str]:
    """The directories (registry names, or `EVERY_REGISTRY`) that get a hosts.toml."""
    names = [str(r) for r in insecure] + [m.registry for m in mirrors if m.registry]
    if any(not m.registry for m in mirrors):
        names.append(EVERY_REGISTRY)
    return list(dict.fromkeys(names))


def hosts_files(
    insecure_registries: Iterable[str],
    mirror_entries: Iterable[str],
    *,
    dial_timeout: str = "",
) -> dict[str, str]:
    """hosts.toml text per directory name under config_path, for these settings.

    `dial_timeout` (a Go duration such as "3s") bounds each connection attempt; give it only
    to a containerd that reads it. Raises RegistryHostsError for a bad registry or mirror.
    """
    insecure = [str(r).strip() for r in insecure_registries]
    for name in insecure:
        if not REGISTRY_NAME.fullmatch(name):
            raise RegistryHostsError(
                f"insecure registry {name!r} is not HOST or HOST:PORT", "insecure_registries"
            )
    try:
        mirrors = parse_mirrors(mirror_entries)
    except ValueError as exc:
        raise RegistryHostsError(str(exc), "registry_mirrors") from None
    files: dict[str, str] = {}
    for name in registry_dirs(insecure, mirrors):
        lines = [MANAGED_HEADER, ""]
        if name != EVERY_REGISTRY:
            lines += [f'server = "{_origin(name, name in insecure)}"', ""]
        own = [m for m in mirrors if m.registry == name]
        every = [m for m in mirrors if not m.registry]
        hosts = [(m.url, '["pull", "resolve"]') for m in own + every]
        if not hosts:
            # containerd 1.6 refuses a hosts.toml without a [host] table ("invalid `host`
            # tree") and falls back to HTTPS: the origin gets one, server stays its fallback.
            hosts = [(_origin(name, name in insecure), '["pull", "resolve", "push"]')]
        for url, capabilities in hosts:
            lines.append(f'[host."{url}"]')
            lines.append(f"  capabilities = {capabilities}")
            if dial_timeout:
                lines.append(f'  dial_timeout = "{dial_timeout}"')
            lines.append("")
        files[name] = "\n".join(lines).rstrip("\n") + "\n"
    return files


def _origin(registry: str, insecure: bool) -> str:
    if registry == _DOCKER_HUB:
        return "https://registry-1.docker.io"
    return f"{'http' if insecure else 'https'}://{registry}"


def reads_dial_timeout(containerd_version: str) -> bool:
    """Whether a containerd of this version (1.6.20, 2.1.0, ...) reads `dial_timeout`."""
    parts = containerd_version.split(".")[:2]
    try:
        return tuple(int(p) for p in parts) >= DIAL_TIMEOUT_SINCE
    except ValueError:
        return False
