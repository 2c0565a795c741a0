"""Build the node binaries into a bundle directory, reproducibly, reusing an up-to-date one."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import apull_node

from . import bootstrap
from .artefacts import (
    ANY,
    BINARIES,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANYLINUX_TAGS,
    NODE_ARCHES,
    NODE_PYTHONS,
    RUNTIME_DIR,
    SUPPORTED,
    BinarySpec,
    BuiltBinary,
    Bundle,
    BundleError,
    Serves,
    load_bundle,
    native_key,
    sha256_file,
)

#: The node package: all the binaries are built from it (and their wheels).
PACKAGE_ROOT = Path(apull_node.__file__).resolve().parent
#: Native dependencies bundled into the snapshotter, per (arch, python3), pinned to what the
#: venv runs (so the tests here exercise the same versions).
NATIVE_DEPENDENCIES = ("grpcio", "protobuf", "typing-extensions")
#: Pure dependencies bundled into every binary: tomllib's backport for python3 < 3.11.
PURE_DEPENDENCIES = ("tomli",)
#: Sub-packages each binary needs (besides apull_node/__init__.py).
PACKAGES_OF = {
    "apull-containerd-grpc": ("service", "snapshotter", "cri", "image"),
    "apulld": ("service", "daemon", "image"),
}
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class _Member:
    arcname: str
    data: bytes
    executable: bool = False


@dataclass(frozen=True)
class _Artefact:
    """One file to build: a binary for one platform, and what goes into it."""

    spec: BinarySpec
    platform: str
    serves: Serves
    sources: tuple[_Member, ...]
    wheels: tuple[Path, ...]

    def build_id(self) -> str:
        """Covers only this artefact's inputs: a change to apulld leaves the snapshotter's
        bytes (and the runtime it unpacked on the nodes) as they were."""
        digest = hashlib.sha256(f"{apull_node.__version__}\0{self.platform}\0".encode())
        digest.update(bootstrap.PURE.encode() + bootstrap.UNPACKING.encode())
        digest.update(bootstrap.DISPATCH.encode())
        for member in self.sources:
            digest.update(f"{member.arcname}\0".encode())
            digest.update(hashlib.sha256(member.data).digest())
        for wheel in self.wheels:
            digest.update(f"{wheel.name}\0{sha256_file(wheel)}\0".encode())
        return digest.hexdigest()


def default_bundle_dir() -> Path:
    from apull.paths import suite_root

    return Path(os.environ.get("APULL_BUNDLE_DIR", suite_root() / "build" / "bundle"))


def wheel_cache_dir() -> Path:
    from apull.paths import suite_root

    return Path(os.environ.get("APULL_WHEEL_CACHE", suite_root() / ".apull" / "wheels"))


def generate_protos() -> None:
    """The snapshotter's gRPC stubs are generated, never committed: make sure they exist."""
    result = subprocess.run(
        [sys.executable, "-m", "apull_node.snapshotter.api.generate"],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BundleError(f"generating the gRPC stubs failed: {result.stderr.strip()}")


def _package_members(subpackages: tuple[str, ...]) -> tuple[_Member, ...]:
    members = [_Member("apull_node/__init__.py", (PACKAGE_ROOT / "__init__.py").read_bytes())]
    for sub in subpackages:
        for path in sorted((PACKAGE_ROOT / sub).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            arcname = "apull_node/" + path.relative_to(PACKAGE_ROOT).as_posix()
            members.append(_Member(arcname, path.read_bytes()))
    return tuple(members)


def _pinned(dist: str) -> str:
    return f"{dist}=={metadata.version(dist)}"


def _download(pins: list[str], cache: Path, tags: list[str]) -> list[Path]:
    """Wheels for `pins` (downloaded once into `cache`, then reused)."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = {p.split("==")[0].replace("-", "_").lower() + "-" + p.split("==")[1] for p in pins}

    def cached() -> list[Path]:
        wheels = sorted(cache.glob("*.whl"))
        return [w for w in wheels if "-".join(w.name.split("-")[:2]).lower() in wanted]

    if len(cached()) < len(pins):
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--no-deps", *tags, "--dest", str(cache), *pins,
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BundleError(f"cannot download {', '.join(pins)}: {result.stderr.strip()}")
    found = cached()
    if len(found) < len(pins):
        raise BundleError(f"{cache}: expected wheels for {', '.join(pins)}, found {found}")
    return found


def fetch_wheels(arch: str, python: str) -> list[Path]:
    """The native dependencies' wheels for one (arch, python3) of the nodes."""
    platforms = [arg for tag in MANYLINUX_TAGS for arg in ("--platform", tag.format(arch=arch))]
    return _download(
        [_pinned(d) for d in NATIVE_DEPENDENCIES],
        wheel_cache_dir() / native_key(arch, python),
        ["--implementation", "cp", "--python-version", python, *platforms],
    )


def fetch_pure_wheels() -> list[Path]:
    """The pure dependencies' wheels (py3-none-any: the same for every node)."""
    return _download(
        [_pinned(d) for d in PURE_DEPENDENCIES],
        wheel_cache_dir() / "pure",
        ["--python-version", NODE_PYTHONS[0], "--implementation", "py", "--abi", "none",
         "--platform", "any"],
    )  # fmt: skip


def _wheel_members(wheels: tuple[Path, ...]) -> list[_Member]:
    members = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                executable = bool((info.external_attr >> 16) & 0o111) or info.filename.endswith(
                    ".so"
                )
                members.append(_Member(info.filename, zf.read(info), executable))
    return members


def _write_zipapp(path: Path, members: list[_Member], main_py: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as out:
        out.write(f"#!/usr/bin/python3\n# apull node binary: {path.name}\n".encode())
        with zipfile.ZipFile(out, "w") as zf:
            entries = [*members, _Member("__main__.py", main_py.encode())]
            for member in sorted(entries, key=lambda m: m.arcname):
                info = zipfile.ZipInfo(member.arcname, date_time=ZIP_EPOCH)
                info.external_attr = (0o755 if member.executable else 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, member.data, compresslevel=6)
    tmp.chmod(0o755)
    tmp.replace(path)


def _artefacts() -> list[_Artefact]:
    """Every file of the bundle: apulld once, the snapshotter once per (arch, python3)."""
    pure = tuple(fetch_pure_wheels())
    artefacts = []
    for spec in BINARIES:
        sources = _package_members(PACKAGES_OF[spec.name])
        if not spec.native:
            artefacts.append(_Artefact(spec, ANY, SUPPORTED, sources, pure))
            continue
        for arch in NODE_ARCHES:
            for python in NODE_PYTHONS:
                wheels = (*pure, *fetch_wheels(arch, python))
                serves = Serves((arch,), (python,))
                artefacts.append(_Artefact(spec, native_key(arch, python), serves, sources, wheels))
    return artefacts


def _fingerprint(build_ids: list[str]) -> str:
    digest = hashlib.sha256(f"{MANIFEST_FORMAT}\0".encode())
    for build_id in build_ids:
        digest.update(build_id.encode())
    return digest.hexdigest()


def _build_one(artefact: _Artefact, out_dir: Path, build_id: str) -> BuiltBinary:
    spec = artefact.spec
    members = [*artefact.sources, *_wheel_members(artefact.wheels)]
    main_py = bootstrap.render(
        spec.name,
        apull_node.__version__,
        build_id,
        spec.entry,
        unpack=any(m.arcname.endswith(".so") for m in members),
        runtime_dir=RUNTIME_DIR,
        commands=dict(spec.commands),
    )
    path = out_dir / artefact.platform / spec.name
    _write_zipapp(path, members, main_py)
    return BuiltBinary(
        spec.name,
        spec.install_path,
        spec.mode,
        spec.service,
        sha256_file(path),
        path.stat().st_size,
        platform=artefact.platform,
        serves=artefact.serves,
    )


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_bundle(out_dir: Path | None = None, force: bool = False) -> tuple[Bundle, bool]:
    """The bundle for the current sources; (bundle, built) where built says it was (re)made."""
    out_dir = out_dir or default_bundle_dir()
    with _locked(out_dir):  # Ansible's forks all ask at once: one builds, the others reuse
        generate_protos()
        artefacts = _artefacts()
        build_ids = [a.build_id() for a in artefacts]
        fingerprint = _fingerprint(build_ids)
        if not force:
            try:
                existing = load_bundle(out_dir)
            except BundleError:
                existing = None
            if existing is not None and existing.fingerprint == fingerprint:
                return existing, False
        built = tuple(
            _build_one(artefact, out_dir, build_id[:16])
            for artefact, build_id in zip(artefacts, build_ids, strict=True)
        )
        bundle = Bundle(out_dir, apull_node.__version__, fingerprint, built)
        bundle.write_manifest()
        _prune(bundle)
        return bundle, True


def _prune(bundle: Bundle) -> None:
    """Remove what an older build left in the directory (files of another layout)."""
    keep = {bundle.path_of(b) for b in bundle.binaries}
    keep |= {p.parent for p in keep} | {bundle.directory / MANIFEST_NAME}
    for path in sorted(bundle.directory.rglob("*"), reverse=True):
        if path in keep or path.name == ".lock":
            continue
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()


def members_listing(path: Path) -> list[str]:
    """Names inside a built binary (for tests and `apull bundle --list`)."""
    with path.open("rb") as f, zipfile.ZipFile(io.BytesIO(f.read())) as zf:
        return zf.namelist()
