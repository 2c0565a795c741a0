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

import apull

from . import bootstrap
from .artefacts import (
    BINARIES,
    RUNTIME_DIR,
    BinarySpec,
    BuiltBinary,
    Bundle,
    BundleError,
    load_bundle,
    sha256_file,
)

PACKAGE_ROOT = Path(apull.__file__).resolve().parent
#: The nodes' python3 (Debian 12). The bundled native wheels are built for this version.
NODE_PYTHON = "3.11"
#: Runtime dependencies bundled into the snapshotter, pinned to what the venv runs.
NATIVE_DEPENDENCIES = ("grpcio", "protobuf", "typing-extensions")
#: Sub-packages each binary needs (besides apull/__init__.py).
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


def default_bundle_dir() -> Path:
    from apull.paths import suite_root

    return Path(os.environ.get("APULL_BUNDLE_DIR", suite_root() / "build" / "bundle"))


def wheel_cache_dir() -> Path:
    from apull.paths import suite_root

    return Path(os.environ.get("APULL_WHEEL_CACHE", suite_root() / ".apull" / "wheels"))


def generate_protos() -> None:
    """The snapshotter's gRPC stubs are generated, never committed: make sure they exist."""
    result = subprocess.run(
        [sys.executable, "-m", "apull.snapshotter.api.generate"],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BundleError(f"generating the gRPC stubs failed: {result.stderr.strip()}")


def _package_members(subpackages: tuple[str, ...]) -> list[_Member]:
    members = [_Member("apull/__init__.py", (PACKAGE_ROOT / "__init__.py").read_bytes())]
    for sub in subpackages:
        for path in sorted((PACKAGE_ROOT / sub).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            arcname = "apull/" + path.relative_to(PACKAGE_ROOT).as_posix()
            members.append(_Member(arcname, path.read_bytes()))
    return members


def _pinned(dist: str) -> str:
    return f"{dist}=={metadata.version(dist)}"


def fetch_wheels(python: str = NODE_PYTHON) -> list[Path]:
    """Wheels of the native dependencies for the nodes' Python (downloaded once, cached)."""
    cache = wheel_cache_dir() / f"cp{python.replace('.', '')}"
    cache.mkdir(parents=True, exist_ok=True)
    pins = [_pinned(d) for d in NATIVE_DEPENDENCIES]
    wanted = {p.split("==")[0].replace("-", "_").lower() + "-" + p.split("==")[1] for p in pins}

    def cached() -> list[Path]:
        wheels = sorted(cache.glob("*.whl"))
        return [w for w in wheels if "-".join(w.name.split("-")[:2]).lower() in wanted]

    if len(cached()) < len(pins):
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--no-deps", "--implementation", "cp",
            "--python-version", python, "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--dest", str(cache), *pins,
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BundleError(f"cannot download {', '.join(pins)}: {result.stderr.strip()}")
    found = cached()
    if len(found) < len(pins):
        raise BundleError(f"{cache}: expected wheels for {', '.join(pins)}, found {found}")
    return found


def _wheel_members(wheels: list[Path]) -> list[_Member]:
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


def _fingerprint(parts: dict[str, list[_Member]], python: str) -> str:
    digest = hashlib.sha256(f"{apull.__version__}\0{python}\0".encode())
    digest.update(bootstrap.PURE.encode() + bootstrap.UNPACKING.encode())
    digest.update(bootstrap.DISPATCH.encode())
    for name in sorted(parts):
        for member in parts[name]:
            digest.update(f"{name}\0{member.arcname}\0".encode())
            digest.update(hashlib.sha256(member.data).digest())
    return digest.hexdigest()


def _members_by_binary(python: str) -> dict[str, list[_Member]]:
    wheels = _wheel_members(fetch_wheels(python))
    parts: dict[str, list[_Member]] = {}
    for spec in BINARIES:
        members = _package_members(PACKAGES_OF[spec.name])
        if spec.name == "apull-containerd-grpc":
            members += wheels
        parts[spec.name] = members
    return parts


def _build_one(spec: BinarySpec, members: list[_Member], out_dir: Path, build_id: str) -> Path:
    main_py = bootstrap.render(
        spec.name,
        apull.__version__,
        build_id,
        spec.entry,
        unpack=any(m.arcname.endswith(".so") for m in members),
        runtime_dir=RUNTIME_DIR,
        commands=dict(spec.commands),
    )
    path = out_dir / spec.name
    _write_zipapp(path, members, main_py)
    return path


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_bundle(
    out_dir: Path | None = None, python: str = NODE_PYTHON, force: bool = False
) -> tuple[Bundle, bool]:
    """The bundle for the current sources; (bundle, built) where built says it was (re)made."""
    out_dir = out_dir or default_bundle_dir()
    with _locked(out_dir):  # Ansible's forks all ask at once: one builds, the others reuse
        generate_protos()
        parts = _members_by_binary(python)
        fingerprint = _fingerprint(parts, python)
        if not force:
            try:
                existing = load_bundle(out_dir)
            except BundleError:
                existing = None
            if existing is not None and existing.fingerprint == fingerprint:
                return existing, False
        built = []
        for spec in BINARIES:
            # Each binary's build id covers only its own members: a change to apulld's code
            # leaves the snapshotter's bytes (and its unpacked runtime) as they were.
            build_id = _fingerprint({spec.name: parts[spec.name]}, python)[:16]
            path = _build_one(spec, parts[spec.name], out_dir, build_id)
            built.append(
                BuiltBinary(
                    spec.name,
                    spec.install_path,
                    spec.mode,
                    spec.service,
                    sha256_file(path),
                    path.stat().st_size,
                )
            )
        bundle = Bundle(out_dir, apull.__version__, fingerprint, python, tuple(built))
        bundle.write_manifest()
        return bundle, True


def members_listing(path: Path) -> list[str]:
    """Names inside a built binary (for tests and `apull bundle --list`)."""
    with path.open("rb") as f, zipfile.ZipFile(io.BytesIO(f.read())) as zf:
        return zf.namelist()
