"""The chart's installer image (`apull chart-image`): what the DaemonSet of charts/apull runs.

Three layers, each a reproducible tar (sorted members, fixed owner, this build's files only):

1. **base**: Debian 12 (minbase with python3, util-linux's nsenter), debootstrapped once into
   the lab cache (`rootfs-chart`), without apt's lists and caches or documentation;
2. **python**: the controller's Python packages from this venv, copied file by file from
   their installed records: ansible-core and what it needs, tomlkit (containerd's config
   patch), in /opt/apull/lib; kubectl in /opt/apull/bin (the uninstall hook);
3. **suite**: this checkout's playbooks, roles, collection, inventory group_vars, the
   controller and node packages (src/apull, src/apull_node), and the prebuilt node bundle
   (/opt/apull/bundle), with a BUILD file naming the build.

The image's tag is the build: a digest of the three layers, so a changed role, bundle or
package is a new tag (and `helm upgrade --set image.tag=...` a rollout), and pushing the
same build twice uploads nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from apull.bundle.artefacts import Bundle
from apull.kube.kubectl import KubeError, kubectl_binary
from apull.lab import emulation, layout
from apull.lab import image as lab_image
from apull.lab.run import LabError
from apull.paths import suite_root
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient

REPO = "apull/installer"
#: The base root's packages (minbase has util-linux, hence nsenter).
BASE_PACKAGES = "python3,ca-certificates"
BASE_FLAVOUR = "chart"
#: Left out of the base layer: apt's state and caches, documentation, translations.
BASE_SKIP = (
    "var/cache/apt/",
    "var/lib/apt/lists/",
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/locale/",
    "dev/",
    "proc/",
    "sys/",
    "run/",
    "tmp/",
)
#: The Python distributions the suite's controller side needs in the pod (and their own
#: requirements, found from their metadata).
PYTHON_ROOTS = ("ansible-core", "tomlkit", "packaging")
#: The suite's files the playbooks need, relative to the checkout.
SUITE_PATHS = (
    "ansible.cfg",
    "playbooks",
    "roles",
    "collections/ansible_collections/apull",
    "inventory/group_vars",
    "src/apull",
    "src/apull_node",
)
SUITE_SKIP_PARTS = ("__pycache__", "molecule", ".pytest_cache")
OPT = "opt/apull"
#: The python and suite layers' file times (2023-11-14): the same build, the same bytes.
FIXED_MTIME = 1_700_000_000


@dataclass(frozen=True)
class InstallerImage:
    tag: str
    architecture: str
    config: Blob
    layers: tuple[Blob, ...]

    def reference(self, registry: str) -> str:
        return f"{registry}/{REPO}:{self.tag}"


def _skipped(relative: str, skip: Iterable[str]) -> bool:
    """Entries ending in / skip what is under that directory (the directory stays); others
    skip that one path."""
    return any(relative.startswith(s) if s.endswith("/") else relative == s for s in skip)


def _tree(root: Path, skip: Iterable[str] = ()) -> Iterator[tuple[str, Path]]:
    """(path relative to the directory `root`, path here) for everything under it, sorted,
    without following symbolic links."""
    skip = tuple(skip)
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if _skipped(relative, skip) or any(p in SUITE_SKIP_PARTS for p in path.parts):
            continue
        yield relative, path


def _layer(members: Iterable[tuple[str, Path]], mtime: int | None = None) -> tuple[Blob, str]:
    """A gzip layer of `members` (owner root; times kept, or all set to `mtime`) and its
    diff id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        for name, path in members:
            if name in seen:
                continue
            seen.add(name)
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if mtime is not None:
                info.mtime = mtime
                info.pax_headers = {}
            if info.isreg():
                with path.open("rb") as content:
                    tar.addfile(info, content)
            else:
                tar.addfile(info)
    data = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    return Blob(OCI_LAYER_GZIP, gzip.compress(data, compresslevel=6, mtime=0)), diff_id


def _parents(names: Iterable[str]) -> list[str]:
    found: set[str] = set()
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            found.add("/".join(parts[:i]))
    return sorted(found)


def python_distributions(roots: Iterable[str] = PYTHON_ROOTS) -> list[metadata.Distribution]:
    """`roots` and everything they require (markers evaluated for this Python), by name."""
    wanted: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in wanted:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as err:
            raise LabError(f"the chart image needs {name}, which this venv lacks") from err
        wanted[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [wanted[k] for k in sorted(wanted)]


def _python_members() -> list[tuple[str, Path]]:
    """Each distribution's installed files (its RECORD), under /opt/apull/lib."""
    members: dict[str, Path] = {}
    for dist in python_distributions():
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file))).resolve()
            parts = Path(str(file)).parts
            if ".." in parts or "__pycache__" in parts or not path.is_file():
                continue  # scripts in bin/, compiled caches
            members[f"{OPT}/lib/{Path(str(file)).as_posix()}"] = path
    try:
        members[f"{OPT}/bin/kubectl"] = Path(kubectl_binary()).resolve()
    except KubeError as err:
        raise LabError(str(err)) from err
    names = sorted(members)
    return [*((d, _dir_source()) for d in _parents(names)), *((n, members[n]) for n in names)]


def _dir_source() -> Path:
    """A directory to stand for the layers' parent directories (mode 0755)."""
    stand_in = layout.cache_dir() / "chart-dir"
    stand_in.mkdir(parents=True, exist_ok=True)
    stand_in.chmod(0o755)
    return stand_in


def _suite_files() -> list[tuple[str, Path]]:
    """(path relative to the checkout, path here) of the suite's files in the image."""
    root = suite_root()
    found: list[tuple[str, Path]] = []
    for relative in SUITE_PATHS:
        source = root / relative
        if not source.exists():
            raise LabError(f"{source} is missing from this checkout")
        if source.is_dir():
            found.append((relative, source))
            found += [(f"{relative}/{name}", path) for name, path in _tree(source)]
        else:
            found.append((relative, source))
    return found


def _suite_members(bundle: Bundle, build_file: Path) -> list[tuple[str, Path]]:
    members = [(f"{OPT}/suite/{name}", path) for name, path in _suite_files()]
    members.append((f"{OPT}/bundle", bundle.directory))
    members += [(f"{OPT}/bundle/{n}", p) for n, p in _tree(bundle.directory, skip=(".lock",))]
    members.append((f"{OPT}/BUILD", build_file))
    names = {n for n, _ in members}
    dirs = [(d, _dir_source()) for d in _parents(names) if d not in names]
    return sorted([*dirs, *members])


def build(bundle: Bundle, log: Callable[[str], None]) -> InstallerImage:
    """The installer image for this checkout and `bundle` (the base root made once)."""
    arch = emulation.host_arch()
    base_root = lab_image.ensure_rootfs(log, packages=BASE_PACKAGES, flavour=BASE_FLAVOUR)
    nsenter = base_root / "usr/bin/nsenter"
    if not nsenter.exists():
        raise LabError(f"{base_root} has no usr/bin/nsenter (util-linux)")
    # The venv's packages (compiled ones among them) run under the base's python3.
    ours = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not (base_root / "usr/bin" / ours).exists():
        raise LabError(f"the image's Debian 12 root has no {ours} (this venv's): build the "
                       "chart image from a venv of Debian 12's python3")  # fmt: skip
    base, base_id = _layer(_tree(base_root, skip=BASE_SKIP))
    log(f"base layer: {len(base.data) / 1e6:.1f} MB ({base_root})")
    python, python_id = _layer(_python_members(), mtime=FIXED_MTIME)
    log(f"python layer: {len(python.data) / 1e6:.1f} MB (ansible-core, tomlkit, kubectl)")
    # The build's name covers the other layers, the bundle and the suite's files.
    digest = hashlib.sha256()
    for piece in (base_id, python_id, bundle.fingerprint):
        digest.update(piece.encode())
    for name, path in _suite_files():
        digest.update(name.encode())
        if path.is_symlink():
            digest.update(str(path.readlink()).encode())
        elif path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    tag = digest.hexdigest()[:16]
    build_file = layout.cache_dir() / "chart-BUILD"
    build_file.write_text(tag + "\n")
    suite, suite_id = _layer(_suite_members(bundle, build_file), mtime=FIXED_MTIME)
    log(f"suite layer: {len(suite.data) / 1e6:.1f} MB (playbooks, roles, bundle; build {tag})")
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": [
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                f"PYTHONPATH=/{OPT}/lib:/{OPT}/suite/src",
                f"ANSIBLE_CONFIG=/{OPT}/suite/ansible.cfg",
            ],
            "Entrypoint": ["/usr/bin/python3", "-m", "apull.chart.pod"],
            "WorkingDir": f"/{OPT}/suite",
            "Labels": {"io.apull.build": tag},
        },
        "rootfs": {"type": "layers", "diff_ids": [base_id, python_id, suite_id]},
    }
    config_blob = Blob(OCI_CONFIG, json.dumps(config, sort_keys=True).encode())
    return InstallerImage(tag, arch, config_blob, (base, python, suite))


def push(client: RegistryClient, image: InstallerImage) -> str:
    """Push the image under its build tag; returns the manifest digest."""
    return client.push_image(REPO, image.tag, image.config, list(image.layers))
