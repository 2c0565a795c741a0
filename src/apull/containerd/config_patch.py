"""Patch containerd's config.toml for the apull proxy snapshotter, touching nothing else.

`patch_config(text)` returns the new text and what changed. It sets, and only sets:

- `[proxy_plugins.<name>]` `type = "snapshot"` and `address = "<socket>"` (other proxy
  plugins and other keys of this one are kept);
- in the CRI image settings, `disable_snapshot_annotations = false` and
  `discard_unpacked_layers = false` (the snapshotter needs the layer annotations, and the
  layers kept, for lazy pulls), and `snapshotter = "<name>"` only when asked;
- when `registry_hosts` names registries (the directories the containerd role writes
  hosts.toml files into: plain-HTTP registries, mirrored ones, `_default`), CRI's
  `registry.config_path` (`[plugins."io.containerd.grpc.v1.cri".registry]`, version 3: under
  `plugins."io.containerd.cri.v1.images"`) is set to `hosts_dir`, unless the file sets one
  already: then its first directory is where the files go (containerd 2.x's default
  `config_path` included). containerd refuses `registry.mirrors` and `configs.<host>.tls`
  beside `config_path`: a mirror entry an earlier apull wrote (`endpoint = ["http://HOST"]`
  for a registry named here) is removed, and any other such entry is refused, naming it;
- any extra `overrides` (dotted key path -> value), after the above.

Where the CRI settings live depends on the config's `version`: 2 (containerd 1.x) keeps them
in `[plugins."io.containerd.grpc.v1.cri".containerd]`, 3 (containerd 2.x) in
`[plugins."io.containerd.cri.v1.images"]`. A file without `version` is version 1, which
this refuses (the operator migrates it first).

How it stays safe: every edit goes through tomlkit, which keeps comments, ordering and every
untouched byte; lines it adds are indented like the file's own. After each edit the new text
is parsed again with the standard library's TOML reader and must mean exactly the old text
plus the intended keys; anything else (a form tomlkit cannot extend cleanly) raises
ConfigPatchError naming the key, and no text is returned. A key already holding the wanted
value is left alone, so a second run returns the text unchanged.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.container import OutOfOrderTableProxy
from tomlkit.items import AoT, InlineTable, Item, String, StringType, Table, Whitespace

from apull.containerd.registry_hosts import DEFAULT_HOSTS_DIR

DEFAULT_PROXY_ADDRESS = "/run/containerd-apull-grpc.sock"
DEFAULT_SNAPSHOTTER = "apull"
DEFAULT_GRPC_ADDRESS = "/run/containerd/containerd.sock"

# Where each config version keeps the CRI plugin's image settings.
CRI_IMAGE_TABLES: dict[int, tuple[str, ...]] = {
    2: ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
    3: ("plugins", "io.containerd.cri.v1.images"),
}
# Where each config version keeps CRI's registry settings (mirrors, config_path).
CRI_REGISTRY_TABLES: dict[int, tuple[str, ...]] = {
    2: ("plugins", "io.containerd.grpc.v1.cri", "registry"),
    3: ("plugins", "io.containerd.cri.v1.images", "registry"),
}
# Plugin ids that, in disabled_plugins, switch the CRI settings off.
CRI_PLUGIN_IDS: dict[int, tuple[str, ...]] = {
    2: ("cri", "io.containerd.grpc.v1.cri"),
    3: ("io.containerd.cri.v1.images", "io.containerd.grpc.v1.cri"),
}

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PLUGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HEADER = re.compile(r"^([ \t]*)\[(?!\[)\s*(.+?)\s*\][ \t]*(#.*)?$")
_SENTINEL = "__apull_key_path__"

Value = str | bool | int | float | list[Any]


class ConfigPatchError(ValueError):
    """The config cannot be patched safely; the message names the file and the key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Change:
    """One key the patch set: `old` is None when the key was absent."""

    path: tuple[str, ...]
    old: Any
    new: Any

    @property
    def key(self) -> str:
        return format_key_path(self.path)

    def describe(self) -> str:
        old = "(absent)" if self.old is None else _show(self.old)
        new = "(removed)" if self.new is None else _show(self.new)
        return f"{self.key}: {old} -> {new}"

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class PatchResult:
    text: str
    version: int
    changes: tuple[Change, ...] = ()
    # Things the operator should know that are not errors (CRI disabled, imports, ...).
    notes: tuple[str, ...] = ()
    # Where the hosts.toml files go (config_path's first directory); "" without registry_hosts.
    hosts_dir: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def format_key_path(path: Sequence[str]) -> str:
    """TOML spelling of a key path: bare parts as is, others quoted."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else _basic_string(p) for p in path)


def parse_key_path(dotted: str) -> tuple[str, ...]:
    """Split a TOML dotted key (`plugins."io.containerd.grpc.v1.cri".containerd`) into parts,
    quotes and escapes read as TOML reads them."""
    try:
        data = tomllib.loads(f'{dotted} = "{_SENTINEL}"')
    except tomllib.TOMLDecodeError as exc:
        raise ConfigPatchError(f"{dotted!r} is not a TOML key path: {exc}", dotted) from exc
    parts: list[str] = []
    node: Any = data
    while isinstance(node, dict) and len(node) == 1:
        (key, node) = next(iter(node.items()))
        parts.append(key)
    if node != _SENTINEL or not parts:
        raise ConfigPatchError(f"{dotted!r} is not a single TOML key path", dotted)
    return tuple(parts)


def grpc_address(text: str) -> str:
    """The socket containerd serves its API on under this config (`[grpc] address`)."""
    try:
        grpc = tomllib.loads(text).get("grpc")
    except tomllib.TOMLDecodeError:
        return DEFAULT_GRPC_ADDRESS
    address = grpc.get("address") if isinstance(grpc, dict) else None
    return address if isinstance(address, str) and address else DEFAULT_GRPC_ADDRESS


def cri_default_snapshotter_key(text: str, source: str = "config.toml") -> str:
    """The dotted key of CRI's default snapshotter in this config's version."""
    version = _version(_load(text, source), source)
    return format_key_path((*CRI_IMAGE_TABLES[version], "snapshotter"))


def patch_config(
    text: str,
    *,
    proxy_address: str = DEFAULT_PROXY_ADDRESS,
    snapshotter_name: str = DEFAULT_SNAPSHOTTER,
    set_default_snapshotter: bool = False,
    registry_hosts: Sequence[str] = (),
    hosts_dir: str = DEFAULT_HOSTS_DIR,
    overrides: Mapping[str, Any] | None = None,
    source: str = "config.toml",
) -> PatchResult:
    """The patched text of a containerd config.toml, and each key that changed.

    `source` names the file in error messages. Raises ConfigPatchError when the text is not
    TOML, is a version 1 (or unknown version) config, or cannot be edited safely.
    """
    # Plain builtins from here on (Ansible hands over str subclasses and the like).
    proxy_address = str(_plain(proxy_address, "proxy_address"))
    snapshotter_name = str(_plain(snapshotter_name, "snapshotter_name"))
    if not _PLUGIN_NAME.fullmatch(snapshotter_name):
        raise ConfigPatchError(f"snapshotter name {snapshotter_name!r} is not a plugin name")
    if not proxy_address.startswith("/"):
        raise ConfigPatchError(f"proxy address {proxy_address!r} is not an absolute socket path")
    data = _load(text, source)
    version = _version(data, source)

    editor = _Editor(text, source)
    cri = CRI_IMAGE_TABLES[version]
    cri_items: dict[str, Value] = {
        "disable_snapshot_annotations": False,
        "discard_unpacked_layers": False,
    }
    if bool(set_default_snapshotter):
        cri_items["snapshotter"] = snapshotter_name
    editor.set(cri, cri_items)
    editor.set(("proxy_plugins", snapshotter_name), {"type": "snapshot", "address": proxy_address})
    registries = [str(_plain(r, "registry_hosts")) for r in registry_hosts]
    used_dir = ""
    if registries:
        used_dir = _set_config_path(editor, data, version, registries, str(hosts_dir), source)
    for dotted, value in (overrides or {}).items():
        path = parse_key_path(str(dotted))
        editor.set(path[:-1], {path[-1]: _plain(value, dotted)})

    return PatchResult(
        text=editor.text,
        version=version,
        changes=tuple(editor.changes),
        notes=tuple(_notes(data, version, snapshotter_name)),
        hosts_dir=used_dir,
    )


def _set_config_path(
    editor: _Editor,
    data: Mapping[str, Any],
    version: int,
    registries: list[str],
    hosts_dir: str,
    source: str,
) -> str:
    """Make containerd read hosts.toml files; the directory they go to."""
    registry = CRI_REGISTRY_TABLES[version]
    key = format_key_path((*registry, "config_path"))
    config_path = _lookup(data, (*registry, "config_path"), source)
    if config_path is not None and not isinstance(config_path, str):
        raise ConfigPatchError(f"{source}: {key} is {_kind(config_path)}, not a string", key)
    if not config_path and not hosts_dir.startswith("/"):
        raise ConfigPatchError(f"hosts dir {hosts_dir!r} is not an absolute path", "hosts_dir")
    mirrors = _lookup(data, (*registry, "mirrors"), source) or {}
    for name in registries:
        entry = mirrors.get(name) if isinstance(mirrors, dict) else None
        if isinstance(entry, dict) and entry == {"endpoint": [f"http://{name}"]}:
            editor.remove((*registry, "mirrors", name))  # what an earlier apull wrote
    after = _lookup(_load(editor.text, source), (*registry, "mirrors"), source) or {}
    where = config_path.split(":")[0] if config_path else hosts_dir
    if after:
        first = next(iter(after)) if isinstance(after, dict) else ""
        mirror_key = format_key_path((*registry, "mirrors", first) if first else registry)
        raise ConfigPatchError(
            f"{source}: {mirror_key} is a registry mirror in config.toml, which containerd "
            f"refuses beside {key}; apull needs {key} for its hosts.toml files "
            f"({', '.join(registries)}). Move the mirror to {where}/{first or '<host>'}"
            f"/hosts.toml, or name it in REGISTRY_MIRRORS (config.txt), and run again",
            mirror_key,
        )
    configs = _lookup(data, (*registry, "configs"), source) or {}
    for host, settings in configs.items() if isinstance(configs, dict) else ():
        if isinstance(settings, dict) and "tls" in settings:
            tls_key = format_key_path((*registry, "configs", host, "tls"))
            raise ConfigPatchError(
                f"{source}: {tls_key} is refused by containerd beside {key}, which apull needs "
                f"for its hosts.toml files; move it to {where}/{host}/hosts.toml (ca, "
                f"client, skip_verify) and run again",
                tls_key,
            )
    if not config_path:
        editor.set(registry, {"config_path": hosts_dir})
    return where


# --- reading ------------------------------------------------------------------------------


def _load(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigPatchError(f"{source} is not valid TOML: {exc}") from exc


def _version(data: Mapping[str, Any], source: str) -> int:
    version = data.get("version")
    if version is None or version == 1:
        raise ConfigPatchError(
            f"{source} is a version 1 containerd config (it has no `version = 2` or "
            "`version = 3` line), which apull does not patch. Migrate it first and review the "
            "result: on containerd 1.6/1.7 `containerd config dump` prints the current "
            "config as version 2 (containerd --config OLD config dump > NEW), on containerd "
            "2.x run `containerd config migrate`. Then put NEW in place and run again.",
            "version",
        )
    if isinstance(version, bool) or version not in CRI_IMAGE_TABLES:
        raise ConfigPatchError(
            f"{source}: unsupported config version {version!r} (apull patches versions 2 and 3)",
            "version",
        )
    return int(version)


def _notes(data: Mapping[str, Any], version: int, name: str) -> list[str]:
    notes = []
    disabled = data.get("disabled_plugins") or []
    cri_off = [p for p in CRI_PLUGIN_IDS[version] if p in disabled]
    if cri_off:
        notes.append(
            f"disabled_plugins lists {', '.join(cri_off)}: the CRI image settings are set "
            "but nothing uses them until the CRI plugin is enabled"
        )
    if f"io.containerd.snapshotter.v1.{name}" in disabled:
        notes.append(
            f"disabled_plugins lists io.containerd.snapshotter.v1.{name}: containerd will not "
            f"load the {name} snapshotter until it is removed from that list"
        )
    imports = data.get("imports") or []
    if imports:
        notes.append(
            "the config imports "
            + ", ".join(str(i) for i in imports)
            + ": a key set there overrides this file"
        )
    return notes


def _lookup(data: Mapping[str, Any], path: Sequence[str], source: str) -> Any:
    """The plain value at path, None if any part is absent; errors for non-tables."""
    node: Any = data
    for depth, part in enumerate(path):
        if isinstance(node, list):
            raise ConfigPatchError(
                f"{source}: {format_key_path(path[:depth])} is an array of tables; "
                f"cannot set {format_key_path(path)} in it",
                format_key_path(path),
            )
        if not isinstance(node, dict):
            raise ConfigPatchError(
                f"{source}: {format_key_path(path[:depth])} is {_kind(node)}, not a table; "
                f"cannot set {format_key_path(path)}",
                format_key_path(path),
            )
        if part not in node:
            return None
        node = node[part]
    return node


# --- values -------------------------------------------------------------------------------


def _plain(value: Any, key: str) -> Value:
    """A builtin TOML value (Ansible hands over str subclasses and the like)."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v, key) for v in value]
    if isinstance(value, Mapping):
        raise ConfigPatchError(f"override {key}: set the keys of a table one by one", key)
    raise ConfigPatchError(f"override {key}: {type(value).__name__} is not a TOML value", key)


def _toml_type(value: Any) -> type:
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return kind
    return type(value)


def _same(a: Any, b: Any) -> bool:
    """Equal in value and in TOML type (true is not 1, 1 is not 1.0)."""
    if _toml_type(a) is not _toml_type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _is_aot(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, dict) for v in value)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _basic_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _kind(value: Any) -> str:
    """The kind of a value with its article, for messages: "a string", "an array", ..."""
    if isinstance(value, list) and _is_aot(value):
        return "an array of tables"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), "a " + type(value).__name__)


def _basic_string(value: str) -> str:
    return tomlkit.string(value).as_string()


def _first_difference(a: Any, b: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return (*path, key)
            found = _first_difference(a[key], b[key], (*path, key))
            if found is not None:
                return found
        return None
    return None if _same(a, b) else path


# --- the file's own layout -----------------------------------------------------------------


@dataclass
class _Style:
    """How the file lays out its tables, so that added lines look like its own."""

    unit: str = " "
    header_step: int = 0  # header indent per nesting level
    key_offset: int = 0  # key indent relative to its table's header
    blank_before_header: bool = False
    literal_strings: bool = False

    @classmethod
    def of(cls, text: str) -> _Style:
        lines = text.splitlines()
        steps: Counter[int] = Counter()
        offsets: Counter[int] = Counter()
        blanks: Counter[bool] = Counter()
        unit = " "
        for n, line in enumerate(lines):
            m = _HEADER.match(line)
            if not m:
                continue
            indent = m.group(1)
            if "\t" in indent:
                unit = "\t"
            try:
                depth = len(parse_key_path(m.group(2)))
            except ConfigPatchError:
                continue
            if depth >= 2 and len(indent) % (depth - 1) == 0:
                steps[len(indent) // (depth - 1)] += 1
            if n > 0:
                blanks[not lines[n - 1].strip()] += 1
            for follower in lines[n + 1 :]:
                stripped = follower.strip()
                if not stripped or stripped.startswith("#"):
                    continue
                if not _HEADER.match(follower):
                    body_indent = len(follower) - len(follower.lstrip(" \t"))
                    offsets[body_indent - len(indent)] += 1
                break
        header_step = steps.most_common(1)[0][0] if steps else 0
        key_offset = offsets.most_common(1)[0][0] if offsets else header_step
        literal = len(re.findall(r"=\s*'", text)) > len(re.findall(r'=\s*"', text))
        return cls(
            unit=unit,
            header_step=header_step,
            key_offset=max(key_offset, 0),
            blank_before_header=blanks[True] > blanks[False],
            literal_strings=literal,
        )


# --- editing ------------------------------------------------------------------------------


@dataclass
class _Editor:
    text: str
    source: str
    changes: list[Change] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.style = _Style.of(self.text)
        # Marks tag the lines tomlkit adds (as comments) so the layout pass can find them.
        self._token = "apull-new-" + uuid.uuid4().hex[:12]
        self._mark_re = re.compile(r"[ \t]*#[ \t]*" + self._token + r"-(\d+)[ \t]*$")
        self._marks: list[tuple[str, int]] = []  # (kind, depth of the table path)
        self._newline = "\r\n" if "\r\n" in self.text else "\n"

    def set(self, table: tuple[str, ...], items: Mapping[str, Value]) -> None:
        """Set each key of `items` in the table at path `table`, creating what is missing."""
        data = _load(self.text, self.source)
        node = _lookup(data, table, self.source)
        if node is not None and not isinstance(node, dict):
            raise ConfigPatchError(
                f"{self.source}: {format_key_path(table)} is {_kind(node)}, not a table",
                format_key_path(table),
            )
        wanted: dict[str, Value] = {}
        changes: list[Change] = []
        for key, value in items.items():
            path = (*table, key)
            old = None if node is None else node.get(key)
            if isinstance(old, dict) or (isinstance(old, list) and _is_aot(old)):
                raise ConfigPatchError(
                    f"{self.source}: {format_key_path(path)} is {_kind(old)}; "
                    f"refusing to replace it with {_show(value)}",
                    format_key_path(path),
                )
            if old is None or not _same(old, value):
                wanted[key] = value
                changes.append(Change(path, old, value))
        if not wanted:
            return
        if self.text and not self.text.endswith("\n"):
            # Lines are added after the last one: it gets its line ending first.
            self.text += self._newline
        expected = _with(data, table, wanted)
        key_name = format_key_path((*table, next(iter(wanted))))
        attempts = [self._edit_in_place]
        if node is None:
            attempts.append(self._append_table)
        problem = ""
        for attempt in attempts:
            try:
                candidate = self._layout(attempt(table, wanted))
                result = tomllib.loads(candidate)
            except (tomlkit.exceptions.TOMLKitError, tomllib.TOMLDecodeError, ValueError) as exc:
                problem = str(exc)
                continue
            off = _first_difference(expected, result)
            if off is None:
                self.text = candidate
                self.changes.extend(changes)
                return
            problem = f"the edit would also change {format_key_path(off) or 'the top level'}"
        raise ConfigPatchError(
            f"{self.source}: cannot set {key_name} safely in the way this file writes "
            f"{format_key_path(table) or 'the top level'} ({problem}); set it by hand",
            key_name,
        )

    def remove(self, path: tuple[str, ...]) -> None:
        """Remove the key (or table) at path; refused unless nothing else changes."""
        data = _load(self.text, self.source)
        old = _lookup(data, path, self.source)
        if old is None:
            return
        expected = copy.deepcopy(data)
        parent = expected
        for part in path[:-1]:
            parent = parent[part]
        del parent[path[-1]]
        key_name = format_key_path(path)
        try:
            doc = tomlkit.parse(self.text)
            node: Any = doc
            for part in path[:-1]:
                node = node[part]
            del node[path[-1]]
            candidate = doc.as_string()
            # An emptied table may go with its last key: the same config to containerd.
            off = _first_difference(_pruned(expected), _pruned(tomllib.loads(candidate)))
        except (tomlkit.exceptions.TOMLKitError, tomllib.TOMLDecodeError, KeyError) as exc:
            off, problem = (), str(exc)
        else:
            problem = f"the edit would also change {format_key_path(off or ())}"
        if off is not None:
            raise ConfigPatchError(
                f"{self.source}: cannot remove {key_name} safely ({problem}); remove it by hand",
                key_name,
            )
        self.text = candidate
        self.changes.append(Change(path, old, None))

    # Attempt 1: tomlkit, in the table where it is (or under its nearest existing parent).
    def _edit_in_place(self, table: tuple[str, ...], items: Mapping[str, Value]) -> str:
        doc = tomlkit.parse(self.text)
        # tomlkit puts a blank line before the table that follows an added key; the file's
        # own lines keep their layout, so note the tables' indents and put them back.
        indents = [(t, t.trivia.indent) for t in _tables_in(doc)]
        node: Any = doc
        depth = 0
        for part in table:
            if part not in node:
                break
            node = node[part]
            depth += 1
        if not isinstance(node, Table | InlineTable | OutOfOrderTableProxy | tomlkit.TOMLDocument):
            raise ValueError(f"{format_key_path(table[:depth])} is not a table")
        missing = table[depth:]
        if not missing:
            for key, value in items.items():
                new = key not in node
                item = self._item(value, node.get(key), node, mark=new, depth=len(table))
                if new and isinstance(node, InlineTable):
                    _add_inline(node, key, item)
                else:
                    node[key] = item
        elif isinstance(node, InlineTable):
            _add_inline(node, missing[0], self._inline(missing[1:], items))
        else:
            created = self._tables(missing, items, len(table) - len(missing))
            node[missing[0]] = created[0]
            for t in created:  # no blank line from tomlkit: the layout pass decides
                t.trivia.indent = ""
        for t, indent in indents:
            t.trivia.indent = indent
        return doc.as_string()

    # Attempt 2, for a table that does not exist yet: a [header] at the end of the file.
    def _append_table(self, table: tuple[str, ...], items: Mapping[str, Value]) -> str:
        nl = self._newline
        lines = [f"[{format_key_path(table)}] {self._mark('header', len(table))}{nl}"]
        for key, value in items.items():
            item = self._item(value, None, None, mark=True, depth=len(table))
            lines.append(
                f"{format_key_path((key,))} = {item.as_string()} {item.trivia.comment}{nl}"
            )
        return self.text + "".join(lines)

    def _tables(
        self, missing: tuple[str, ...], items: Mapping[str, Value], base: int
    ) -> list[Table]:
        """New tables for the missing path parts, outermost first; the innermost holds items.
        Intermediate tables get a header only in files that nest headers visibly."""
        created: list[Table] = []
        for n, _part in enumerate(missing):
            depth = base + n + 1
            last = n == len(missing) - 1
            super_table = not last and self.style.header_step == 0
            t = tomlkit.table(is_super_table=super_table)
            if not super_table:
                t.comment(self._mark("header", depth).lstrip("# "))
            created.append(t)
        inner = created[-1]
        for key, value in items.items():
            inner.add(key, self._item(value, None, inner, mark=True, depth=base + len(missing)))
        for outer, child, part in zip(created, created[1:], missing[1:], strict=False):
            outer.add(part, child)
        return created

    def _inline(self, missing: tuple[str, ...], items: Mapping[str, Value]) -> Item:
        inner = tomlkit.inline_table()
        inner.update({k: self._item(v, None, None, mark=False, depth=0) for k, v in items.items()})
        for part in reversed(missing):
            outer = tomlkit.inline_table()
            outer[part] = inner
            inner = outer
        inner.trivia.indent = " "
        return inner

    def _item(self, value: Value, old: Any, parent: Any, *, mark: bool, depth: int) -> Item:
        if isinstance(value, str):
            literal = self._literal(old, parent) and "'" not in value and value.isprintable()
            item: Item = tomlkit.string(value, literal=literal)
        else:
            item = tomlkit.item(value)
        if mark:
            item.comment(self._mark("key", depth).lstrip("# "))
        return item

    def _literal(self, old: Any, parent: Any) -> bool:
        """Keep a replaced string's quotes; new strings quote like their table, or the file."""
        if isinstance(old, String):
            return old.type in (StringType.SLL, StringType.MLL)
        if isinstance(parent, Table | InlineTable):
            for _key, sibling in parent.value.body:
                if isinstance(sibling, String):
                    return sibling.type in (StringType.SLL, StringType.MLL)
        return self.style.literal_strings

    def _mark(self, kind: str, depth: int) -> str:
        self._marks.append((kind, depth))
        return f"# {self._token}-{len(self._marks) - 1}"

    # The layout pass: marked lines get the file's indentation, marks are removed.
    def _layout(self, text: str) -> str:
        if self._token not in text:
            return text
        style = self.style
        out: list[str] = []
        header_indent = ""
        ours_last = False
        for line in text.splitlines(keepends=True):
            ending = line[len(line.rstrip("\r\n")) :]
            body = line[: len(line) - len(ending)]
            m = self._mark_re.search(body)
            is_header = _HEADER.match(body) is not None
            if m is None:
                if is_header:
                    header_indent = body[: len(body) - len(body.lstrip(" \t"))]
                    if style.blank_before_header and ours_last and out and out[-1].strip():
                        out.append(self._newline)
                out.append(line)
                ours_last = False
                continue
            kind, depth = self._marks[int(m.group(1))]
            content = body[: m.start()].strip(" \t")
            if kind == "header":
                header_indent = style.unit * (style.header_step * max(depth - 1, 0))
                if style.blank_before_header and out and out[-1].strip():
                    out.append(self._newline)
                out.append(header_indent + content + self._newline)
            else:
                out.append(self._key_indent(out, header_indent) + content + self._newline)
            ours_last = True
        laid_out = "".join(out)
        if self._token in laid_out:
            raise ValueError("tomlkit wrote an added key where it cannot be laid out")
        return laid_out

    def _key_indent(self, out: Sequence[str], header_indent: str) -> str:
        for previous in reversed(out):
            stripped = previous.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if _HEADER.match(previous.rstrip("\r\n")):
                return header_indent + self.style.unit * self.style.key_offset
            return previous[: len(previous) - len(previous.lstrip(" \t"))]
        return ""


def _tables_in(container: Any) -> list[Table]:
    """Every table (and array-of-tables element) in a tomlkit document, depth first."""
    found: list[Table] = []
    body = container.value.body if isinstance(container, Table) else container.body
    for _key, item in body:
        if isinstance(item, AoT):
            for element in item.body:
                found.append(element)
                found.extend(_tables_in(element))
        elif isinstance(item, Table):
            found.append(item)
            found.extend(_tables_in(item))
    return found


def _add_inline(table: InlineTable, key: str, item: Item) -> None:
    """Add a key to an inline table as `, key = value`, before its closing padding."""
    body = table.value.body
    padding = None
    last = body[-1][1] if body and body[-1][0] is None else None
    if isinstance(last, Whitespace) and "," not in last.s:
        padding = body.pop()
    item.trivia.indent = " "
    table[key] = item
    if padding is not None:
        body.append(padding)


def _pruned(value: Any) -> Any:
    """The value without empty tables (recursively)."""
    if not isinstance(value, dict):
        return value
    kept = {k: _pruned(v) for k, v in value.items()}
    return {k: v for k, v in kept.items() if v != {}}


def _with(data: Mapping[str, Any], table: Sequence[str], items: Mapping[str, Any]) -> Any:
    """A copy of data with items set in table (created as needed)."""
    copy: dict[str, Any] = dict(data)
    node = copy
    for part in table:
        child = dict(node.get(part) or {})
        node[part] = child
        node = child
    node.update(items)
    return copy


def unified_diff(before: str, after: str, name: str = "config.toml") -> str:
    """A unified diff of two config texts (for tests and messages)."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"{name} (before)",
            tofile=f"{name} (after)",
        )
    )
