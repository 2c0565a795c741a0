"""A node's probe report judged against this checkout: its state and what is wrong.

States, worst first: unreachable (no report), failing (something the stack needs does not
work), drifted (it works, but the node is not what this checkout would make it: an older
binary, a config.toml edited after the patch), ready. Warnings (recent errors, a closed
fs_ctl gate, a cache over its limit) are shown without changing the state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from apull.bundle.artefacts import Bundle, NodePlatform, UnsupportedPlatform
from apull.containerd import config_patch, registry_hosts
from apull_node.image.registry_mirrors import parse_mirrors

from .probe import SERVICES


class State(enum.IntEnum):
    """A node's state; a larger value is worse (the fleet's is its worst node's)."""

    READY = 0
    DRIFTED = 1
    FAILING = 2
    UNREACHABLE = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Level(enum.Enum):
    WARN = "warn"
    DRIFT = "drift"
    FAIL = "fail"


_STATE_OF = {Level.WARN: State.READY, Level.DRIFT: State.DRIFTED, Level.FAIL: State.FAILING}


@dataclass(frozen=True)
class Finding:
    level: Level
    what: str  #: the part: binary, service, containerd, apulld, kernel, cache, errors
    text: str

    def as_json(self) -> dict[str, str]:
        return {"level": self.level.value, "what": self.what, "text": self.text}


@dataclass(frozen=True)
class BinaryCheck:
    name: str
    path: str
    installed: str | None
    expected: str | None

    @property
    def current(self) -> bool:
        return self.installed is not None and self.installed == self.expected


@dataclass(frozen=True)
class ConfigCheck:
    patched: bool  #: apull's keys hold the values this node's patch set
    edited: bool  #: the file changed since the patch was written (False: unknown or same)
    drifted_keys: tuple[str, ...] = ()
    recorded: bool = False


@dataclass
class NodeStatus:
    name: str
    address: str
    report: dict[str, Any] | None = None
    error: str = ""
    findings: list[Finding] = field(default_factory=list)
    binaries: list[BinaryCheck] = field(default_factory=list)
    config: ConfigCheck | None = None
    seconds: float = 0.0

    @property
    def state(self) -> State:
        if self.report is None:
            return State.UNREACHABLE
        return max((_STATE_OF[f.level] for f in self.findings), default=State.READY)

    def add(self, level: Level, what: str, text: str) -> None:
        self.findings.append(Finding(level, what, text))


def assess(status: NodeStatus, bundle: Bundle) -> NodeStatus:
    """Fill in the findings of a node whose report came back."""
    report = status.report
    if report is None:
        return status
    _settings(status, report)
    _binaries(status, report, bundle)
    _services(status, report)
    _apulld(status, report)
    _plugin(status, report)
    _containerd_config(status, report)
    _kernel(status, report)
    _cache(status, report)
    errors = report.get("errors") or []
    if errors:
        status.add(Level.WARN, "errors", f"{len(errors)} warning(s) or error(s) in the last hour")
    return status


def platform_of(report: dict[str, Any]) -> NodePlatform:
    host = report.get("host") or {}
    return NodePlatform(
        arch=str(host.get("arch", "")), glibc=str(host.get("glibc", "")),
        python=str(host.get("python", "")),
    )  # fmt: skip


def expected_binaries(bundle: Bundle) -> list[str]:
    """The install paths the probe hashes (each binary's, once)."""
    return list(dict.fromkeys(b.install_path for b in bundle.binaries))


def _settings(status: NodeStatus, report: dict[str, Any]) -> None:
    error = (report.get("settings") or {}).get("error")
    if error:
        status.add(Level.FAIL, "settings", f"/etc/apull/config.toml: {error}")


def _binaries(status: NodeStatus, report: dict[str, Any], bundle: Bundle) -> None:
    installed = report.get("binaries") or {}
    try:
        wanted = {b.install_path: b for b in bundle.for_node(platform_of(report))}
    except UnsupportedPlatform as err:
        status.add(Level.FAIL, "binary", str(err))
        wanted = {}
    for path in expected_binaries(bundle):
        built = wanted.get(path)
        name = built.name if built else path.rsplit("/", 1)[-1]
        check = BinaryCheck(name, path, installed.get(path), built.sha256 if built else None)
        status.binaries.append(check)
        if check.installed is None:
            status.add(Level.FAIL, "binary", f"{path} is not installed")
        elif built is not None and not check.current:
            status.add(
                Level.DRIFT, "binary",
                f"{name} is another build ({check.installed[:12]}; this checkout's is "
                f"{built.sha256[:12]}): make sync-bin",
            )  # fmt: skip


def _services(status: NodeStatus, report: dict[str, Any]) -> None:
    units = report.get("services") or {}
    for unit in SERVICES:
        state = units.get(unit) or {}
        active = state.get("active") or "unknown"
        if active != "active":
            sub = state.get("sub")
            status.add(Level.FAIL, "service", f"{unit} is {active}{f' ({sub})' if sub else ''}")


def _apulld(status: NodeStatus, report: dict[str, Any]) -> None:
    ping = report.get("apulld") or {}
    answer = ping.get("answer")
    if answer is None:
        status.add(Level.FAIL, "apulld", f"apulld does not answer: {ping.get('error', '?')}")
    elif answer.get("backend") in (None, "none"):
        reasons = "; ".join(answer.get("reasons") or []) or "no reason given"
        status.add(Level.FAIL, "apulld", f"apulld serves nothing (backend none): {reasons}")


def _plugin(status: NodeStatus, report: dict[str, Any]) -> None:
    plugin = report.get("plugin") or {}
    if plugin.get("status") != "ok":
        found = plugin.get("status") or plugin.get("error") or "not listed"
        status.add(Level.FAIL, "containerd", f"containerd's apull plugin: {found}")


def _patch_args(record: dict[str, Any] | None, report: dict[str, Any]) -> dict[str, Any]:
    if record is None:  # patched before records existed: the role's defaults
        address = (report.get("settings") or {}).get("snapshotter_address")
        return {"proxy_address": address or config_patch.DEFAULT_PROXY_ADDRESS}
    return {
        "proxy_address": str(record.get("proxy_address", config_patch.DEFAULT_PROXY_ADDRESS)),
        "snapshotter_name": str(record.get("snapshotter_name", config_patch.DEFAULT_SNAPSHOTTER)),
        "set_default_snapshotter": bool(record.get("set_default_snapshotter", False)),
        "registry_hosts": _registry_dirs(record),
        "hosts_dir": str(record.get("registry_hosts_dir") or registry_hosts.DEFAULT_HOSTS_DIR),
        "overrides": dict(record.get("overrides") or {}),
    }


def _registry_dirs(record: dict[str, Any]) -> list[str]:
    """The hosts.toml directories the recorded patch asked for (config_path is set for them)."""
    try:
        mirrors = parse_mirrors(record.get("registry_mirrors") or [])
    except ValueError:
        mirrors = ()  # a record edited by hand: judged as if it named no mirror
    return registry_hosts.registry_dirs(record.get("insecure_registries") or [], mirrors)


def _containerd_config(status: NodeStatus, report: dict[str, Any]) -> None:
    found = report.get("containerd_config") or {}
    path, text = found.get("path", "config.toml"), found.get("text")
    if text is None:
        status.add(Level.FAIL, "containerd", f"{path} is missing or unreadable")
        return
    record = found.get("record")
    edited = record is not None and record.get("sha256") != found.get("sha256")
    try:
        result = config_patch.patch_config(text, source=path, **_patch_args(record, report))
    except config_patch.ConfigPatchError as err:
        status.add(Level.FAIL, "containerd", str(err))
        return
    keys = tuple(c.key for c in result.changes)
    status.config = ConfigCheck(not keys, edited, keys, record is not None)
    if keys and record is None:
        text = f"{path} is not patched for apull: {', '.join(keys)}; make all patches it"
        status.add(Level.DRIFT, "containerd", text)
    elif keys:
        status.add(
            Level.DRIFT, "containerd",
            f"{path} is no longer patched (edited after the patch): {', '.join(keys)}; "
            "make all patches it again",
        )  # fmt: skip
    elif edited:
        status.add(
            Level.WARN, "containerd", f"{path} was edited after the patch; apull's keys hold"
        )


def _kernel(status: NodeStatus, report: dict[str, Any]) -> None:
    gate = report.get("fs_ctl")
    answer = (report.get("apulld") or {}).get("answer") or {}
    closed = sorted(name for name, value in (gate or {}).items() if value not in ("1", "Y", "y"))
    if closed and answer.get("backend") != "file":
        status.add(Level.WARN, "kernel", f"fs_ctl gate closed: {', '.join(closed)}")


def _cache(status: NodeStatus, report: dict[str, Any]) -> None:
    cache = report.get("cache") or {}
    answer = (report.get("apulld") or {}).get("answer") or {}
    used, limit = int(cache.get("bytes") or 0), int(cache.get("limit_bytes") or 0)
    # The file backend keeps its cache within the limit; cachefiles culls by free space.
    if answer.get("backend") == "file" and limit and used > limit * 1.05:
        status.add(Level.WARN, "cache", f"cache {used >> 20} MiB is over its {limit >> 20} MiB")
