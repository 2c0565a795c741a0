"""/etc/apull/config.toml: the settings both node services read.

Every key has a default, so a missing file or table means "defaults". Wrong types and unknown
keys are refused with the file and key named, before a service binds anything.

The file starts with `version = 1` (the apull role writes it so): lists are TOML arrays of
strings. A file without a version is the format before it, where lists were one
comma-separated string; it is still read, so that new binaries start on a node whose settings
the role has not rewritten yet. Any other version is refused, naming what this build reads.

`metrics_address` ([apulld] and [snapshotter]) turns the service's Prometheus metrics on
(GET /metrics, service/metrics_endpoint.py): "" is off (the default), "host:port" or
"[IPv6 address]:port" the TCP address they are served on; anything else is refused. A
service that cannot bind the address logs why and runs without metrics.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the nodes' python3 3.9 / 3.10: the bundled backport, the same parser
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/apull/config.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("auto", "fscache", "file", "none")
MAX_READ_AHEAD_KB = 65536
#: The settings format this build writes and reads (None: the unversioned one before it).
SETTINGS_VERSION = 1
_HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*\Z")


class SettingsError(Exception):
    """The settings file cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class GlobalSettings:
    log_level: str = "info"


@dataclass(frozen=True)
class SnapshotterSettings:
    # containerd's proxy_plugins.apull.address points here.
    address: str = "/run/containerd-apull-grpc.sock"
    # metadata.db and snapshots/<id>/{fs,work} live here.
    root: str = "/var/lib/containerd-apull"
    # Where the snapshotter reaches apulld.
    apulld_address: str = "/run/apulld.sock"
    # containerd's own socket: image manifests are read from its content store and handed
    # to apulld with warm-ups ("" : apulld fetches them from the registry).
    containerd_address: str = "/run/containerd/containerd.sock"
    # Read-ahead of each mounted layer, in KiB (0: the kernel's, 128 for file-backed EROFS).
    # Set where the kernel names the mount's backing-dev info (Linux >= 6.10).
    layer_read_ahead_kb: int = 1024
    # Prometheus metrics at GET /metrics on this host:port ("": off).
    metrics_address: str = ""


@dataclass(frozen=True)
class ApulldSettings:
    address: str = "/run/apulld.sock"
    cache_dir: str = "/var/lib/containerd-apull/cachefiles"
    # auto: fscache on-demand when the kernel accepts it, else file-backed, else none.
    backend: str = "auto"
    # The cachefiles tag (one daemon per tag may bind /dev/cachefiles).
    fscache_tag: str = "apull"
    thread_num: int = 4
    # When containerd pulls an apull image, fetch every layer's chunk table and first chunk
    # at once in the background, and layers of at most prefetch_layer_max_mb whole.
    prefetch_enable: bool = True
    prefetch_layer_max_mb: int = 4
    cache_size_limit_mb: int = 10240
    registry_auth_file: str = "/etc/apull/registry-auth.json"
    # Registry mirrors tried before the origin, in order: "URL" mirrors every registry,
    # "REGISTRY=URL" only that one (URL: http(s)://host[:port]).
    registry_mirrors: tuple[str, ...] = ()
    # Registries (host[:port]) that may use plain HTTP or unverified TLS; loopback
    # registries always may (like docker's insecure-registries).
    registry_insecure: tuple[str, ...] = ()
    # Tries of a failing registry request (connection error, timeout, 429, 5xx) after the
    # first, with exponential backoff; and the timeout of one request, in seconds.
    fetch_retries: int = 4
    fetch_timeout_s: int = 30
    # File backend: where apulld mounts its FUSE directory of blob files ("" means
    # <cache_dir>/../apulld/fuse).
    fuse_mountpoint: str = ""
    # Prometheus metrics at GET /metrics on this host:port ("": off).
    metrics_address: str = ""
    # Node-to-node sharing: serve the verified chunks this node holds on this host:port
    # ("": off) to the addresses of peer_allow, and ask `peers` (http://host:port) for
    # chunks before any mirror or registry.
    peer_address: str = ""
    peer_allow: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    path: Path
    global_: GlobalSettings = field(default_factory=GlobalSettings)
    snapshotter: SnapshotterSettings = field(default_factory=SnapshotterSettings)
    apulld: ApulldSettings = field(default_factory=ApulldSettings)


def _strings(path: Path, where: str, value: Any, legacy: bool) -> tuple[str, ...]:
    """A TOML array of strings (or, in an unversioned file, one comma-separated string)."""
    if legacy and isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingsError(f"{path}: {where}: expected an array of strings, got {value!r}")
    return tuple(value)


def parse_listen_address(text: str) -> tuple[str, int] | None:
    """A metrics_address: None for "" (off), else (host, port) from "host:port" or
    "[v6 address]:port"; ValueError says what is wrong."""
    if text == "":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
        return host[1:-1], int(port)
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a host name or IPv4 address") from None
        raise ValueError("an IPv6 address goes in brackets: [::1]:9810")
    numeric = host.replace(".", "").isdigit()
    if not _HOST_NAME.match(host) or (numeric and not _is_ipv4(host)):
        raise ValueError(f"{host!r} is not a host name or IPv4 address")
    return host, int(port)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _section(path: Path, name: str, raw: Any, cls: type[Any], legacy: bool) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise SettingsError(
                f"{path}: [{name}] {key}: unknown key (known: {', '.join(sorted(known))})"
            )
        default = known[key].default
        if isinstance(default, tuple):
            values[key] = _strings(path, f"[{name}] {key}", value, legacy)
            continue
        # bool is a subclass of int: check it first and exactly.
        if isinstance(default, bool) or isinstance(value, bool):
            if not (isinstance(default, bool) and isinstance(value, bool)):
                raise SettingsError(
                    f"{path}: [{name}] {key}: expected {type(default).__name__}, got {value!r}"
                )
        elif not isinstance(value, type(default)):
            raise SettingsError(
                f"{path}: [{name}] {key}: expected {type(default).__name__}, got {value!r}"
            )
        values[key] = value
    return cls(**values)


def load_settings(path: Path = DEFAULT_CONFIG_PATH) -> Settings:
    """Read the settings file; a missing file gives the defaults."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Settings(path=path)
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"{path}: {err}") from err
    version = raw.pop("version", None)
    if version is not None and (type(version) is not int or version != SETTINGS_VERSION):
        raise SettingsError(
            f"{path}: version: {version!r} is not a settings version this build reads "
            f"({SETTINGS_VERSION}, or none for the format before it); rewrite the file with "
            "the apull role (make all), or install binaries as new as the file"
        )
    legacy = version is None
    unknown = set(raw) - {"global", "snapshotter", "apulld"}
    if unknown:
        raise SettingsError(f"{path}: unknown table(s): {', '.join(sorted(unknown))}")
    settings = Settings(
        path=path,
        global_=_section(path, "global", raw.get("global"), GlobalSettings, legacy),
        snapshotter=_section(
            path, "snapshotter", raw.get("snapshotter"), SnapshotterSettings, legacy
        ),
        apulld=_section(path, "apulld", raw.get("apulld"), ApulldSettings, legacy),
    )
    if settings.global_.log_level not in LOG_LEVELS:
        raise SettingsError(
            f"{path}: [global] log_level: {settings.global_.log_level!r} is not one of "
            f"{', '.join(LOG_LEVELS)}"
        )
    if not 0 <= settings.snapshotter.layer_read_ahead_kb <= MAX_READ_AHEAD_KB:
        raise SettingsError(
            f"{path}: [snapshotter] layer_read_ahead_kb: "
            f"{settings.snapshotter.layer_read_ahead_kb} is not between 0 and {MAX_READ_AHEAD_KB}"
        )
    if settings.apulld.backend not in BACKENDS:
        raise SettingsError(
            f"{path}: [apulld] backend: {settings.apulld.backend!r} is not one of "
            f"{', '.join(BACKENDS)}"
        )
    for name, table in (("snapshotter", settings.snapshotter), ("apulld", settings.apulld)):
        try:
            parse_listen_address(table.metrics_address)
        except ValueError as err:
            raise SettingsError(
                f"{path}: [{name}] metrics_address: {table.metrics_address!r}: {err} "
                '(e.g. "127.0.0.1:9810"; "" turns metrics off)'
            ) from None
    try:
        parse_listen_address(settings.apulld.peer_address)
    except ValueError as err:
        raise SettingsError(
            f"{path}: [apulld] peer_address: {settings.apulld.peer_address!r}: {err} "
            '(e.g. "10.0.0.5:5050"; "" turns sharing off)'
        ) from None
    for peer in settings.apulld.peers:
        if not re.fullmatch(r"http://[A-Za-z0-9.\-\[\]:]+", peer):
            raise SettingsError(
                f"{path}: [apulld] peers: {peer!r} is not http://host:port (a peer's peer_address)"
            )
    return settings
