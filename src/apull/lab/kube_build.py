"""Kubernetes for the lab: the control plane's and the kubelet's binaries, built once from
Debian 12's own `kubernetes` source package (1.20.2, vendor/ included) and kept in the lab
cache, as the lab's other images are. No registry here serves Kubernetes binaries.

The build runs on this machine with Debian's Go 1.19, offline (GOPROXY=off), CGO off and
without the cloud providers. One change makes 1.20's source work with Go 1.19: its vendored
github.com/modern-go/reflect2 1.0.1 crashes when JSON encodes a map under Go 1.18+, so
Debian's packaged 1.0.2 (golang-github-modern-go-reflect2-dev) replaces it. The rest is
Debian's source as it is.

It also compiles the source's pause.c statically: the pod sandbox image (`pause`) the lab
serves from its own registry, since no node can reach registry.k8s.io.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from apull.lab import layout
from apull.lab.image import debian_mirror
from apull.lab.run import LabError, Log, run_logged

#: Debian 12's source package and the version it holds (Debian's own version string).
SOURCE_PACKAGE = "kubernetes"
SOURCE_VERSION = "1.20.5+really1.20.2-1.1+deb12u1"
#: The Kubernetes release those sources are.
KUBE_VERSION = "v1.20.2"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet")
#: Debian packages the build and the control plane need on this machine (make deps-kube).
HOST_PACKAGES = (
    "golang-go", "golang-github-modern-go-reflect2-dev", "etcd-server", "rsync", "dpkg-dev",
)  # fmt: skip


def _multiarch() -> str:
    if shutil.which("gcc") is None:
        return "x86_64-linux-gnu"
    out = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "x86_64-linux-gnu"


REFLECT2 = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
STAMP = "inputs"


def bin_dir() -> Path:
    """Where the built binaries (and pause) are kept: cache/kubernetes-VERSION/bin."""
    return layout.cache_dir() / f"kubernetes-{KUBE_VERSION}" / "bin"


def _inputs_key() -> str:
    """What the binaries depend on: the source version and the build settings. Not the host's
    Go point release: an update of it alone must not rebuild and replace every kubelet."""
    parts = [SOURCE_VERSION, " ".join(BINARIES), "providerless,CGO_ENABLED=0,pause-static"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _missing_host_tools() -> list[str]:
    need = {
        "go": "golang-go", "etcd": "etcd-server", "rsync": "rsync", "dpkg-source": "dpkg-dev",
        "gcc": "gcc",
    }  # fmt: skip
    missing = [pkg for tool, pkg in need.items() if shutil.which(tool) is None]
    if not Path(f"/usr/lib/{_multiarch()}/libc.a").exists():
        missing.append("libc6-dev")  # pause is linked statically
    if not REFLECT2.is_dir():
        missing.append("golang-github-modern-go-reflect2-dev")
    return missing


def ensure_binaries(log: Log) -> Path:
    """The binaries' directory, building them first when they are missing or stale."""
    out = bin_dir()
    key = _inputs_key()
    stamp = out / STAMP
    if (
        stamp.is_file()
        and stamp.read_text() == key
        and all((out / b).is_file() for b in (*BINARIES, "pause"))
    ):
        return out
    missing = _missing_host_tools()
    if missing:
        raise LabError(
            f"building Kubernetes needs {' '.join(missing)}: run `make deps-kube` "
            f"(or apt-get install {' '.join(HOST_PACKAGES)})"
        )
    work = layout.cache_dir() / "kubernetes-build"
    log_file = layout.cache_dir() / "kubernetes-build.log"
    log_file.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    source = _fetch_source(work, log_file, log)
    log(f"building Kubernetes {KUBE_VERSION} ({', '.join(BINARIES)}) from Debian's source "
        f"(about 8 minutes on two cores, once; log: {log_file})")  # fmt: skip
    env = {
        **os.environ,
        "GOFLAGS": "-tags=providerless",
        "CGO_ENABLED": "0",
        "GOPROXY": "off",
        "GOCACHE": str(work / "gocache"),
        "GOPATH": str(work / "gopath"),
    }
    what = " ".join(f"cmd/{b}" for b in BINARIES)
    run_logged(["make", "-C", source, f"WHAT={what}"], log_file, "building Kubernetes", env=env)
    tmp = out.with_name("bin.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    built = source / "_output" / "local" / "bin" / "linux" / "amd64"
    for name in BINARIES:
        shutil.copy2(built / name, tmp / name)
    run_logged(
        ["gcc", "-Os", "-static", "-Wall", "-o", tmp / "pause",
         source / "build" / "pause" / "linux" / "pause.c"],
        log_file, "compiling pause",
    )  # fmt: skip
    (tmp / STAMP).write_text(key)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    log(f"Kubernetes {KUBE_VERSION} built in {time.monotonic() - started:.0f} s into {out}")
    return out


def _fetch_source(work: Path, log_file: Path, log: Log) -> Path:
    """Debian's source package, unpacked with its patches, reflect2 replaced."""
    lists = work / "apt-lists"
    (lists / "partial").mkdir(parents=True)
    sources = work / "sources.list"
    sources.write_text(f"deb-src {debian_mirror()} bookworm main\n")
    apt = [
        "apt-get", "-q", f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={lists}",
    ]  # fmt: skip
    log(f"fetching Debian's {SOURCE_PACKAGE} {SOURCE_VERSION} source")
    run_logged([*apt, "update"], log_file, "apt-get update (deb-src)")
    run_logged(
        ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", work, *apt, "source",
         "--download-only", f"{SOURCE_PACKAGE}={SOURCE_VERSION}"],
        log_file, f"apt-get source {SOURCE_PACKAGE}",
    )  # fmt: skip
    dsc = next(work.glob(f"{SOURCE_PACKAGE}_*.dsc"), None)
    if dsc is None:
        raise LabError(f"apt-get source left no .dsc in {work}; see {log_file}")
    source = work / "src"
    run_logged(["dpkg-source", "-x", dsc, source], log_file, "unpacking the source")
    vendored = source / "vendor" / "github.com" / "modern-go" / "reflect2"
    shutil.rmtree(vendored)
    shutil.copytree(REFLECT2, vendored)
    (vendored / "go.mod").unlink(missing_ok=True)
    return source
