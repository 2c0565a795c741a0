"""What a bundle holds, which nodes each artefact serves, and where each binary goes on a node.

A bundle has one artefact per (binary, platform). apulld is pure Python: one artefact serves
every supported node. The snapshotter carries grpcio's native core, built per CPython minor
version and architecture: one artefact per (arch, python3). Files sit under
`<bundle>/<platform>/<binary>` and `manifest.json` lists, for each, what it serves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
#: Manifest layout; a bundle of another layout is rebuilt, never half-read.
MANIFEST_FORMAT = 2
#: Where installers keep the binary each one replaced, for --rollback.
PREVIOUS_DIR = "/var/lib/apull/previous"
#: Where the snapshotter unpacks its native dependencies, one directory per build.
RUNTIME_DIR = "/var/lib/apull/runtime"

#: Node architectures, as `uname -m` prints them.
NODE_ARCHES = ("x86_64", "aarch64")
#: Node python3 minor versions (RHEL 9 / openEuler 22.03: 3.9; Ubuntu 22.04: 3.10; Debian 12:
#: 3.11; Ubuntu 24.04: 3.12; Debian 13: 3.13).
NODE_PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
#: Oldest glibc a node may have: the bundled wheels are manylinux2014 (glibc 2.17).
GLIBC_MIN = "2.17"
#: The manylinux tags asked of PyPI for an architecture's native wheels (glibc 2.17).
MANYLINUX_TAGS = ("manylinux2014_{arch}", "manylinux_2_17_{arch}")
#: The platform directory of an artefact that serves every node.
ANY = "any"


def version_tuple(text: str) -> tuple[int, ...]:
    """ "2.31" -> (2, 31); anything unparsable -> () (older than every version)."""
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


@dataclass(frozen=True)
class NodePlatform:
    """What a node runs binaries on: `uname -m`, glibc and /usr/bin/python3 ("" if none)."""

    arch: str
    glibc: str
    python: str

    def __str__(self) -> str:
        glibc = f"glibc {self.glibc}" if self.glibc else "no glibc"
        python = f"python3 {self.python}" if self.python else "no python3"
        return f"{self.arch or 'unknown arch'}, {glibc}, {python}"


@dataclass(frozen=True)
class Serves:
    """The nodes an artefact runs on."""

    arches: tuple[str, ...]
    pythons: tuple[str, ...]
    glibc_min: str = GLIBC_MIN

    def covers(self, node: NodePlatform) -> bool:
        return (
            node.arch in self.arches
            and node.python in self.pythons
            and bool(node.glibc)
            and version_tuple(node.glibc) >= version_tuple(self.glibc_min)
        )

    def __str__(self) -> str:
        return describe(self.arches, self.pythons, self.glibc_min)


def describe(arches: tuple[str, ...], pythons: tuple[str, ...], glibc_min: str) -> str:
    span = pythons[0] if len(pythons) == 1 else f"{pythons[0]}-{pythons[-1]}"
    return f"{' or '.join(arches)}, glibc >= {glibc_min}, python3 {span}"


#: Every node some build of each binary serves.
SUPPORTED = Serves(NODE_ARCHES, NODE_PYTHONS)


def native_key(arch: str, python: str) -> str:
    """The platform directory of a native artefact: x86_64-cp311."""
    return f"{arch}-cp{python.replace('.', '')}"


@dataclass(frozen=True)
class BinarySpec:
    """One node binary: its install path, mode and the service that runs it."""

    name: str
    install_path: str
    mode: str
    service: str
    entry: str  #: module:function the zipapp runs
    #: Commands run instead of the entry when the first argument names one:
    #: name -> module:function, called with the arguments after the name.
    commands: tuple[tuple[str, str], ...] = ()
    #: Carries native code: built once per (arch, python3) instead of once for all.
    native: bool = False


BINARIES: tuple[BinarySpec, ...] = (
    BinarySpec(
        "apull-containerd-grpc",
        "/usr/bin/apull-containerd-grpc",
        "0550",
        "apull-snapshotter.service",
        "apull_node.snapshotter.main:run",
        # The CRI image client (pulls as kubelet does) rides along: it needs the same grpc
        # runtime, and a binary without a service would be a special case for every
        # installer (sync-bin, the role's restarts, uninstall).
        commands=(
            ("cri", "apull_node.cri.cli:node_main"),
            ("prewarm", "apull_node.snapshotter.prewarm_command:main"),
        ),
        native=True,
    ),
    BinarySpec(
        "apulld", "/usr/bin/apulld", "0550", "apulld.service", "apull_node.daemon.main:main"
    ),
)


@dataclass(frozen=True)
class BuiltBinary:
    name: str
    install_path: str
    mode: str
    service: str
    sha256: str
    size: int
    #: Where an installer keeps the binary this one replaces.
    previous_dir: str = PREVIOUS_DIR
    #: The bundle subdirectory holding it: "any", or "x86_64-cp311" for a native one.
    platform: str = ANY
    serves: Serves = SUPPORTED

    @property
    def previous_path(self) -> str:
        return f"{self.previous_dir}/{self.name}"


class BundleError(Exception):
    """The bundle is missing, incomplete or does not match its manifest."""


class UnsupportedPlatform(BundleError):
    """No artefact of some binary runs on the node; the message says what it has and needs."""


@dataclass(frozen=True)
class Bundle:
    """A built bundle: the directory, its version and fingerprint, and its artefacts."""

    directory: Path
    version: str
    fingerprint: str
    binaries: tuple[BuiltBinary, ...]

    def path_of(self, binary: BuiltBinary) -> Path:
        return self.directory / binary.platform / binary.name

    @property
    def names(self) -> tuple[str, ...]:
        """Each binary's name once, in the bundle's order."""
        return tuple(dict.fromkeys(b.name for b in self.binaries))

    def for_node(self, node: NodePlatform) -> tuple[BuiltBinary, ...]:
        """The one artefact of each binary that runs on `node`, or UnsupportedPlatform."""
        chosen = []
        for name in self.names:
            fits = [b for b in self.binaries if b.name == name and b.serves.covers(node)]
            if not fits:
                raise UnsupportedPlatform(unsupported_message(node))
            chosen.append(fits[0])
        return tuple(chosen)

    def write_manifest(self) -> None:
        data = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "binaries": [asdict(b) for b in self.binaries],
        }
        tmp = self.directory / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.directory / MANIFEST_NAME)


def unsupported_message(node: NodePlatform) -> str:
    return f"no apull build runs on this node: it has {node}; supported: {SUPPORTED}"


def check_supported(node: NodePlatform) -> str:
    """ "" when some build of every binary serves `node`, else why not (preflight's check)."""
    return "" if SUPPORTED.covers(node) else unsupported_message(node)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _binary(entry: dict[str, object]) -> BuiltBinary:
    serves = entry.pop("serves")
    assert isinstance(serves, dict)
    return BuiltBinary(
        **entry,  # type: ignore[arg-type]
        serves=Serves(tuple(serves["arches"]), tuple(serves["pythons"]), str(serves["glibc_min"])),
    )


def load_bundle(directory: Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest; with `verify`, check every artefact's size and sha256."""
    manifest = directory / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError as err:
        raise BundleError(f"{manifest}: no bundle here; build it with: apull bundle") from err
    except (OSError, ValueError) as err:
        raise BundleError(f"{manifest}: unreadable: {err}") from err
    if data.get("format") != MANIFEST_FORMAT:
        raise BundleError(f"{manifest}: an older bundle layout; rebuild it with: apull bundle")
    try:
        bundle = Bundle(
            directory=directory,
            version=data["version"],
            fingerprint=data["fingerprint"],
            binaries=tuple(_binary(dict(b)) for b in data["binaries"]),
        )
    except (KeyError, TypeError, AssertionError) as err:
        raise BundleError(f"{manifest}: not a bundle manifest ({err!r})") from err
    if verify:
        for binary in bundle.binaries:
            path = bundle.path_of(binary)
            if not path.exists() or sha256_file(path) != binary.sha256:
                raise BundleError(f"{path}: missing or not the file its manifest names")
    return bundle
