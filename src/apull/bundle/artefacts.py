"""What a bundle holds and where each binary goes on a node (shared by every installer)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
#: Where installers keep the binary each one replaced, for --rollback.
PREVIOUS_DIR = "/var/lib/apull/previous"
#: Where the snapshotter unpacks its native dependencies, one directory per build.
RUNTIME_DIR = "/var/lib/apull/runtime"


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


BINARIES: tuple[BinarySpec, ...] = (
    BinarySpec(
        "apull-containerd-grpc",
        "/usr/bin/apull-containerd-grpc",
        "0550",
        "apull-snapshotter.service",
        "apull.snapshotter.main:main",
        # The CRI image client (pulls as kubelet does) rides along: it needs the same grpc
        # runtime, and a binary without a service would be a special case for every
        # installer (sync-bin, the role's restarts, uninstall).
        commands=(("cri", "apull.cri.cli:node_main"),),
    ),
    BinarySpec("apulld", "/usr/bin/apulld", "0550", "apulld.service", "apull.daemon.main:main"),
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

    @property
    def previous_path(self) -> str:
        return f"{self.previous_dir}/{self.name}"


@dataclass(frozen=True)
class Bundle:
    """A built bundle: the directory, its version and fingerprint, and its binaries."""

    directory: Path
    version: str
    fingerprint: str
    python: str
    binaries: tuple[BuiltBinary, ...]

    def path_of(self, binary: BuiltBinary) -> Path:
        return self.directory / binary.name

    def write_manifest(self) -> None:
        data = {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "python": self.python,
            "binaries": [asdict(b) for b in self.binaries],
        }
        tmp = self.directory / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.directory / MANIFEST_NAME)


class BundleError(Exception):
    """The bundle is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(directory: Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest; with `verify`, check every binary's size and sha256."""
    manifest = directory / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError as err:
        raise BundleError(f"{manifest}: no bundle here; build it with: apull bundle") from err
    except (OSError, ValueError) as err:
        raise BundleError(f"{manifest}: unreadable: {err}") from err
    bundle = Bundle(
        directory=directory,
        version=data["version"],
        fingerprint=data["fingerprint"],
        python=data["python"],
        binaries=tuple(BuiltBinary(**b) for b in data["binaries"]),
    )
    if verify:
        for binary in bundle.binaries:
            path = bundle.path_of(binary)
            if not path.exists() or sha256_file(path) != binary.sha256:
                raise BundleError(f"{path}: missing or not the file its manifest names")
    return bundle
