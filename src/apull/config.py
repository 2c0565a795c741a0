"""The operator's config.txt, parsed into a typed cluster model.

config.txt is a shell-like file of ``KEY=VALUE`` lines (it used to be sourced by make and
sh). This module reads it without running a shell: blank lines and ``#`` lines are
skipped, ``export KEY=VALUE`` is accepted, values may be wrapped in single or double
quotes, and `` #`` after an unquoted value starts a comment. Inside double quotes a
backslash escapes ``"``, ``\\``, ``$`` and `````; ``$`` is never expanded. An empty value
means the same as leaving the key out (SSH_USER excepted: it must be set and non-empty).

Every problem in the file is collected with its file and line before :class:`ConfigError`
is raised, so the operator can fix them all in one go.

Standard library only: an Ansible inventory script imports this outside the venv.
"""

from __future__ import annotations

import difflib
import hmac
import ipaddress
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from apull.lab import layout
from apull_node.image.reference import ImageRefError, parse_reference
from apull_node.image.registry_mirrors import parse_mirrors

TARGETS = ("lab", "servers")
KNOWN_KEYS = (
    "TARGET",
    "SSH_USER",
    "SSH_PASSWORD",
    "SSH_KEY",
    "SSH_PORT",
    "KUBECONFIG_PATH",
    "NODES",
    "SERVERS_FILE",
    "LAB_NODES",
    "LAB_STOCK_NODES",
    "LAB_BULLSEYE_NODES",
    "LAB_ARM64_NODES",
    "LAB_KERNEL510_NODES",
    "LAB_KUBERNETES",
    "REGISTRY",
    "REGISTRY_INSECURE",
    "REGISTRY_MIRRORS",
    "PREWARM_IMAGES",
)
#: Keys whose values are secrets: never printed, only handed out by the lookup plugin.
SECRET_KEYS = ("SSH_PASSWORD",)
#: Keys that only mean something for one target; set for the other one, they are ignored.
_SERVERS_ONLY_KEYS = ("SSH_KEY", "SSH_PORT", "NODES", "SERVERS_FILE")
_LAB_ONLY_KEYS = (
    "LAB_NODES",
    "LAB_STOCK_NODES",
    "LAB_BULLSEYE_NODES",
    "LAB_ARM64_NODES",
    "LAB_KERNEL510_NODES",
    "LAB_KUBERNETES",
)
#: Which key puts a lab node in which image variant (the rest are "ondemand").
_LAB_VARIANT_KEYS = (
    ("LAB_STOCK_NODES", "stock"),
    ("LAB_BULLSEYE_NODES", "bullseye"),
    ("LAB_ARM64_NODES", "arm64"),
    ("LAB_KERNEL510_NODES", "kernel510"),
)

DEFAULT_SSH_PORT = 22
DEFAULT_LAB_NODES = 3
#: Lab nodes' sshd ports are forwarded on the host's loopback.
LAB_SSH_HOST = "127.0.0.1"

_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")
_EXPORT = re.compile(r"export\s+")
_COMMENT = re.compile(r"(?:^|\s)#")
_LIST_SEP = re.compile(r"[\s,]+")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_HOST_SYNTAX = "expected HOST, HOST:PORT or [IPv6]:PORT, optionally prefixed by USER@"


class Secret:
    """A string that does not show itself in reprs, logs or tracebacks; see :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "********"

    def __str__(self) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Node:
    """One machine the stack is deployed to."""

    name: str  #: inventory hostname
    host: str  #: address or DNS name to connect to
    port: int
    user: str
    lab_variant: str | None  #: lab image variant ("ondemand"/"stock"); None for servers
    lan_addr: str | None  #: address on the nodes' private network, when known

    @property
    def endpoint(self) -> str:
        """`user@host:port`, an IPv6 address in brackets (`root@[fe80::1]:2222`)."""
        return ssh_endpoint(self.user, self.host, self.port)


def ssh_endpoint(user: str, host: str, port: int) -> str:
    """How a login is shown: `user@host:port`, with an IPv6 address in brackets."""
    return f"{user}@{f'[{host}]' if ':' in host else host}:{port}"


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    target: str
    ssh_user: str
    ssh_password: Secret | None
    ssh_key: Path | None
    ssh_port: int
    kubeconfig_path: Path | None
    registry: str
    registry_insecure: bool
    nodes: tuple[Node, ...]
    warnings: tuple[str, ...]
    #: The lab runs a Kubernetes cluster over its nodes (LAB_KUBERNETES=yes).
    lab_kubernetes: bool = False
    #: REGISTRY_MIRRORS: ``URL`` or ``REGISTRY=URL`` entries, for containerd and apulld.
    registry_mirrors: tuple[str, ...] = ()
    #: PREWARM_IMAGES: images every node pulls and warms (make all, make prewarm).
    prewarm_images: tuple[str, ...] = ()

    def secret(self, key: str) -> Secret | None:
        """The value of the secret config key ``key`` (one of :data:`SECRET_KEYS`)."""
        if key == "SSH_PASSWORD":
            return self.ssh_password
        raise KeyError(f"{key!r} is not a secret key (secret keys: {', '.join(SECRET_KEYS)})")


@dataclass(frozen=True)
class ConfigProblem:
    path: Path
    line: int  #: 1-based; 0 when the problem is not about one line
    key: str  #: "" when the problem is not about one key
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config is unusable; ``problems`` lists everything wrong with it."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def format_problems(err: ConfigError) -> str:
    """A message for the operator: a header line, then one indented line per problem."""
    n = len(err.problems)
    lines = [f"invalid configuration ({n} problem{'' if n == 1 else 's'}):"]
    lines += [f"  {p}" for p in err.problems]
    return "\n".join(lines)


def default_config_path() -> Path:
    """``$APULL_CONFIG``, else config.txt at the top of the repository."""
    env = os.environ.get("APULL_CONFIG")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "config.txt"


def load_config(path: Path) -> ClusterConfig:
    """Read and check the config file at ``path``; raise :class:`ConfigError` if unusable."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([ConfigProblem(path, 0, "", f"cannot read config file: {e}")]) from e
    cfg = parse_config(text, path)
    if cfg.ssh_password is not None and mode & 0o044:
        warning = (
            f"{path}: SSH_PASSWORD is set and the file is readable by other users "
            f"(mode {mode:04o}); run: chmod 600 {path}"
        )
        cfg = replace(cfg, warnings=(*cfg.warnings, warning))
    return cfg


def load_config_with_servers(path: Path, servers_file: Path) -> ClusterConfig:
    """The config at ``path`` aimed at the hosts of a legacy servers.txt instead of its own.

    SSH_USER, SSH_PASSWORD, SSH_KEY and SSH_PORT still come from the config file; TARGET,
    NODES and SERVERS_FILE are replaced (their lines are blanked, so line numbers still hold).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([ConfigProblem(path, 0, "", f"cannot read config file: {e}")]) from e
    replaced = ("TARGET", "NODES", "SERVERS_FILE", *_LAB_ONLY_KEYS)
    kept = ["" if line.split("=", 1)[0].strip() in replaced else line for line in text.splitlines()]
    kept += ["TARGET=servers", f"SERVERS_FILE={servers_file.resolve()}"]
    return parse_config("\n".join(kept) + "\n", path)


def parse_config(text: str, path: Path) -> ClusterConfig:
    """Check config ``text`` read from ``path`` (used in messages and for relative paths)."""
    return _Parser(path).parse(text)


# --- lines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    key: str
    value: str | None  #: None when the value could not be read (already reported)
    line: int


def _split_line(line: str) -> tuple[str, str]:
    """``KEY=VALUE`` (stripped, not a comment) -> (key, raw value); ValueError if no key."""
    line = _EXPORT.sub("", line, count=1) if _EXPORT.match(line) else line
    key, sep, rest = line.partition("=")
    if not sep:
        raise ValueError(f"expected KEY=VALUE, found no '=' in {line!r}")
    if not key.strip():
        raise ValueError("empty key before '='")
    return key.strip(), rest.strip()


def _unquote(raw: str) -> str:
    if not raw or raw[0] not in "\"'":
        comment = _COMMENT.search(raw)
        return (raw[: comment.start()] if comment else raw).strip()
    quote, chars, i = raw[0], [], 1
    while i < len(raw) and raw[i] != quote:
        if quote == '"' and raw[i] == "\\" and raw[i + 1 : i + 2] in ('"', "\\", "$", "`"):
            i += 1
        chars.append(raw[i])
        i += 1
    if i >= len(raw):
        raise ValueError(f"unterminated {quote} quote")
    rest = raw[i + 1 :].strip()
    if rest and not rest.startswith("#"):
        raise ValueError(f"unexpected text after the closing quote: {rest!r}")
    return "".join(chars)


# --- hosts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HostSpec:
    user: str | None
    host: str  #: as written, without brackets
    port: int | None
    key: str  #: normalised host, for finding duplicates


def _parse_port(text: str, token: str) -> int:
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise ValueError(f"bad port {text!r} in {token!r} (expected 1..65535)")


def _host_key(host: str) -> str | None:
    """Normalised ``host`` if it is an IPv4/IPv6 address or DNS name, else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if (
        len(host) <= 253
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()  # so that "10.0.0.300" is not taken for a name
    ):
        return host.lower()
    return None


def _parse_host(token: str) -> _HostSpec:
    malformed = ValueError(f"malformed host {token!r} ({_HOST_SYNTAX})")
    user, at, rest = token.partition("@")
    if not at:
        user, rest = "", token
    elif not _USER.fullmatch(user):
        raise malformed
    port: int | None = None
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket or ":" not in host or (after and not after.startswith(":")):
            raise malformed
        if after:
            port = _parse_port(after[1:], token)
    elif rest.count(":") > 1:  # bare IPv6 address
        host = rest
    else:
        host, colon, port_text = rest.partition(":")
        if colon:
            port = _parse_port(port_text, token)
    key = _host_key(host)
    if key is None:
        raise malformed
    return _HostSpec(user or None, host, port, key)


def _split_list(value: str) -> list[str]:
    return [item for item in _LIST_SEP.split(value) if item]


# --- the model -------------------------------------------------------------------------------


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base_dir = path.parent
        self.problems: list[ConfigProblem] = []
        self.warnings: list[str] = []
        self.entries: dict[str, _Entry] = {}

    def problem(self, message: str, key: str = "", line: int = 0, path: Path | None = None) -> None:
        self.problems.append(ConfigProblem(path or self.path, line, key, message))

    def keyed_problem(self, key: str, message: str) -> None:
        entry = self.entries.get(key)
        self.problem(message, key, entry.line if entry else 0)

    def parse(self, text: str) -> ClusterConfig:
        self.read_entries(text)
        target = self.get("TARGET", "lab")
        if target not in TARGETS:
            self.keyed_problem("TARGET", f"must be 'lab' or 'servers', not {target!r}")
            target = "lab"
        self.warn_ignored(_SERVERS_ONLY_KEYS if target == "lab" else _LAB_ONLY_KEYS, target)
        ssh_user = self.ssh_user(target)
        password = self.get("SSH_PASSWORD")
        lab = target == "lab"
        if lab:
            ssh_key: Path | None = layout.ssh_key_path()
            ssh_port = DEFAULT_SSH_PORT
            nodes = self.lab_nodes()
        else:
            ssh_key = self.existing_file("SSH_KEY")
            ssh_port = self.port("SSH_PORT")
            nodes = self.server_nodes(ssh_user, ssh_port)
        kubernetes = lab and self.bool("LAB_KUBERNETES", False)
        if kubernetes:
            # The kubelet and its CNI plugins are on the Debian 12 amd64 images only.
            variants = {n.lab_variant for n in nodes if n.lab_variant is not None}
            others = sorted(variants - {"ondemand", "stock"})
            if others:
                self.keyed_problem(
                    "LAB_KUBERNETES",
                    f"the lab's Kubernetes runs on ondemand and stock nodes only, not on "
                    f"{', '.join(others)} nodes",
                )
        kubeconfig = self.existing_file("KUBECONFIG_PATH")
        if kubernetes and not self.get("KUBECONFIG_PATH"):
            # The lab writes its cluster-admin kubeconfig when it brings the cluster up.
            kubeconfig = layout.admin_kubeconfig()
        registry = self.registry(layout.guest_registry() if lab else "")
        insecure = self.bool("REGISTRY_INSECURE", lab)
        mirrors = self.registry_mirrors()
        prewarm = self.prewarm_images()
        if self.problems:
            # the config file's problems in line order, then those of the servers file
            raise ConfigError(sorted(self.problems, key=lambda p: (p.path != self.path, p.line)))
        return ClusterConfig(
            path=self.path,
            target=target,
            ssh_user=ssh_user,
            ssh_password=Secret(password) if password else None,
            ssh_key=ssh_key,
            ssh_port=ssh_port,
            kubeconfig_path=kubeconfig,
            registry=registry,
            registry_insecure=insecure,
            registry_mirrors=mirrors,
            prewarm_images=prewarm,
            nodes=tuple(nodes),
            warnings=tuple(self.warnings),
            lab_kubernetes=kubernetes,
        )

    def read_entries(self, text: str) -> None:
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key, raw_value = _split_line(line)
            except ValueError as e:
                self.problem(str(e), line=number)
                continue
            if key not in KNOWN_KEYS:
                close = difflib.get_close_matches(key.upper(), KNOWN_KEYS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.problem(f"unknown key {key!r}{hint}", key, number)
                continue
            if key in self.entries:
                first = self.entries[key].line
                self.problem(f"duplicate key (first set on line {first})", key, number)
                continue
            value: str | None = None
            try:
                value = _unquote(raw_value)
            except ValueError as e:
                self.problem(str(e), key, number)
            self.entries[key] = _Entry(key, value, number)

    def get(self, key: str, default: str = "") -> str:
        entry = self.entries.get(key)
        return entry.value if entry and entry.value else default

    def unreadable(self, key: str) -> bool:
        """Whether ``key`` is set to a value that could not be read (already reported)."""
        entry = self.entries.get(key)
        return entry is not None and entry.value is None

    def warn_ignored(self, keys: Iterable[str], target: str) -> None:
        ignored = [self.entries[k] for k in keys if k in self.entries]
        for entry in sorted(ignored, key=lambda e: e.line):
            if entry.value == "":
                continue
            where = f"{self.path}:{entry.line}"
            self.warnings.append(f"{where}: {entry.key}: ignored when TARGET={target}")

    def ssh_user(self, target: str) -> str:
        user = self.get("SSH_USER")
        if "SSH_USER" not in self.entries:
            self.problem("missing (required); add a line like SSH_USER=root", "SSH_USER")
        elif self.unreadable("SSH_USER"):
            pass
        elif not user:
            self.keyed_problem("SSH_USER", "must not be empty")
        elif not _USER.fullmatch(user):
            self.keyed_problem("SSH_USER", f"not a valid user name: {user!r}")
        elif target == "lab" and user != "root":
            self.keyed_problem(
                "SSH_USER",
                f"must be root when TARGET=lab, not {user!r} "
                "(lab nodes accept root with the lab key)",
            )
        return user

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return Path(os.path.normpath(self.base_dir.absolute() / path))

    def existing_file(self, key: str) -> Path | None:
        value = self.get(key)
        if not value:
            return None
        path = self.resolve(value)
        if not path.is_file():
            self.keyed_problem(key, f"no such file: {path}")
            return None
        return path

    def port(self, key: str) -> int:
        value = self.get(key)
        if not value:
            return DEFAULT_SSH_PORT
        try:
            return _parse_port(value, value)
        except ValueError:
            self.keyed_problem(key, f"bad port {value!r} (expected 1..65535)")
            return DEFAULT_SSH_PORT

    def int_in_range(self, key: str, default: int, low: int, high: int) -> int:
        value = self.get(key)
        if not value:
            return default
        if value.isascii() and value.isdigit() and low <= int(value) <= high:
            return int(value)
        self.keyed_problem(key, f"expected a whole number {low}..{high}, not {value!r}")
        return default

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key).lower()
        if not value:
            return default
        if value in _TRUE + _FALSE:
            return value in _TRUE
        self.keyed_problem(key, f"expected true/false (or yes/no, 1/0), not {self.get(key)!r}")
        return default

    def registry(self, default: str) -> str:
        value = self.get("REGISTRY", default)
        if value:
            try:
                spec: _HostSpec | None = _parse_host(value)
            except ValueError:
                spec = None
            if spec is None or spec.user:
                self.keyed_problem("REGISTRY", f"malformed registry {value!r} (expected HOST:PORT)")
        return value

    def registry_mirrors(self) -> tuple[str, ...]:
        entries = tuple(_split_list(self.get("REGISTRY_MIRRORS")))
        try:
            parse_mirrors(entries)
        except ValueError as exc:
            self.keyed_problem("REGISTRY_MIRRORS", str(exc))
            return ()
        return entries

    def prewarm_images(self) -> tuple[str, ...]:
        entries = tuple(_split_list(self.get("PREWARM_IMAGES")))
        for entry in entries:
            try:
                parse_reference(entry)
            except ImageRefError as exc:
                self.keyed_problem("PREWARM_IMAGES", str(exc))
                return ()
        return entries

    def lab_nodes(self) -> list[Node]:
        count = self.int_in_range("LAB_NODES", DEFAULT_LAB_NODES, 1, layout.MAX_NODES)
        names = [layout.node_name(i) for i in range(1, count + 1)]
        chosen: dict[str, tuple[str, str]] = {}  # node -> (variant, the key that chose it)
        for key, variant in _LAB_VARIANT_KEYS:
            for name in _split_list(self.get(key)):
                if name not in names:
                    self.keyed_problem(
                        key,
                        f"unknown lab node {name!r} (LAB_NODES={count}: {names[0]}..{names[-1]})",
                    )
                elif name in chosen:
                    other, other_key = chosen[name]
                    self.keyed_problem(key, f"{name} is {other} already ({other_key})")
                else:
                    chosen[name] = (variant, key)
        lab_nodes = [
            layout.LabNode(i, chosen.get(layout.node_name(i), ("ondemand", ""))[0])
            for i in range(1, count + 1)
        ]
        return [
            Node(n.name, LAB_SSH_HOST, n.ssh_port, "root", n.variant, n.lan_addr) for n in lab_nodes
        ]

    def server_nodes(self, ssh_user: str, ssh_port: int) -> list[Node]:
        specs: list[_HostSpec] = []
        first_seen: dict[tuple[str, int], str] = {}  # (host, port) -> "file:line"
        tokens: list[tuple[str, Path, int, str]] = []  # (token, file, line, key)
        if nodes := self.get("NODES"):
            line = self.entries["NODES"].line
            tokens += [(token, self.path, line, "NODES") for token in _split_list(nodes)]
        if servers_file := self.existing_file("SERVERS_FILE"):
            tokens += [(t, servers_file, n, "") for t, n in self.read_servers_file(servers_file)]
        given_but_unusable = (
            self.unreadable("NODES")
            or self.unreadable("SERVERS_FILE")
            or (bool(self.get("SERVERS_FILE")) and servers_file is None)
            or any(p.path == servers_file for p in self.problems)
        )
        if not tokens and not given_but_unusable:
            hint = f"{servers_file} lists none" if servers_file else "set NODES or SERVERS_FILE"
            self.keyed_problem("NODES", f"TARGET=servers but no nodes: {hint}")

        for token, path, line, key in tokens:
            try:
                spec = _parse_host(token)
            except ValueError as e:
                self.problem(str(e), key, line, path)
                continue
            ident = (spec.key, spec.port or ssh_port)
            if ident in first_seen:
                message = f"duplicate host {token!r} (first listed at {first_seen[ident]})"
                self.problem(message, key, line, path)
                continue
            first_seen[ident] = f"{path}:{line}"
            specs.append(spec)

        per_host = Counter(spec.key for spec in specs)
        nodes_out = []
        for spec in specs:
            port = spec.port or ssh_port
            name = spec.host if per_host[spec.key] == 1 else f"{spec.host}_{port}"
            user = spec.user or ssh_user
            nodes_out.append(Node(name, spec.host, port, user, lab_variant=None, lan_addr=None))
        return nodes_out

    def read_servers_file(self, path: Path) -> list[tuple[str, int]]:
        """(host token, line number) for each host listed in a legacy servers.txt."""
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            self.keyed_problem("SERVERS_FILE", f"cannot read {path}: {e}")
            return []
        hosts = []
        for number, raw in enumerate(text.splitlines(), start=1):
            comment = _COMMENT.search(raw)
            line = (raw[: comment.start()] if comment else raw).strip()
            if not line:
                continue
            if len(line.split()) > 1:
                self.problem(f"expected one host per line, found {line!r}", line=number, path=path)
                continue
            hosts.append((line, number))
        return hosts
