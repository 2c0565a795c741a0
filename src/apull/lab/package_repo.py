"""The lab's package repository: the rebuilt on-demand modules as a Debian package, served
the ways a real kernel update reaches a node.

In the field a node gets its new kernel as a package (an RPM from an EulerOS ISO or a dnf
repository), installed by the package manager, then a reboot. The lab reproduces that path
for its stock nodes with one Debian package, apull-ondemand-modules-<abi>, which carries
cachefiles.ko and erofs.ko rebuilt with fscache on-demand support plus the fs_ctl gate in
/lib/modules/<abi>/updates/ (what the "ondemand" image has baked in). For the nodes that
change kernel release (kernel510) it also holds a whole kernel (see kernel_packages): the
apull-lab-kernel .deb, the `kernel` RPM and a deliberately broken kernel. They are offered
three ways:

- out/repo/: a flat apt repository (Packages, Packages.gz, Release, the .debs and the RPM),
  served over HTTP on the host's loopback and forwarded into every node as http://repo.lab/
  (``deb [trusted=yes] http://repo.lab/ ./``);
- out/apull-lab.iso, laid out like an OS DVD: Packages/ and repodata/ (the RPMs and their
  dnf repository, made by createrepo_c) at its root, the apt repository in debian/;
- out/repo/<file>: the package files themselves.

The .debs are built with the host's dpkg-deb, the RPM with rpmbuild, the apt index is
written here from ``dpkg-deb -f``, the ISO is made by xorriso.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from apull.lab import kernel_packages, layout, processes
from apull.lab.modules import MODULES
from apull.lab.run import LabError, Log, run_logged, tail

ARCH = "amd64"
#: Appended to the Debian kernel version: the package's own revision.
REVISION = "+apull1"
ISO_NAME = "apull-lab.iso"
#: Where the apt repository sits on the ISO (the RPMs' Packages/ and repodata/ are at its root).
ISO_APT_DIR = "debian"
ISO_VOLUME = "APULL_LAB"
CONFFILE = "etc/modules-load.d/apull-fs-ctl.conf"
STAMP = ".apull-stamp"
#: Bump when the way the repository is laid out changes (the stamp then differs).
FORMAT = "2"
MAINTAINER = "apull lab <apull-lab@localhost>"


def package_name(abi: str) -> str:
    return f"apull-ondemand-modules-{abi}"


def package_version(source_version: str) -> str:
    return f"{source_version}{REVISION}"


def deb_filename(abi: str, source_version: str) -> str:
    """<name>_<version>_amd64.deb, the epoch (if any) left out as Debian does."""
    version = package_version(source_version).split(":", 1)[-1]
    return f"{package_name(abi)}_{version}_{ARCH}.deb"


def _control(abi: str, source_version: str, installed_kib: int) -> str:
    return (
        f"Package: {package_name(abi)}\n"
        f"Version: {package_version(source_version)}\n"
        f"Architecture: {ARCH}\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {installed_kib}\n"
        f"Depends: linux-image-{abi}\n"
        "Section: kernel\n"
        "Priority: optional\n"
        f"Description: on-demand fscache modules (cachefiles, erofs, fs_ctl) for {abi}\n"
        f" cachefiles.ko and erofs.ko of Debian's linux {source_version}, rebuilt with\n"
        " CONFIG_CACHEFILES_ONDEMAND and CONFIG_EROFS_FS_ONDEMAND (fscache on-demand\n"
        " support), and the fs_ctl gate module, loaded at boot, for the apull lab.\n"
        f" They go to /lib/modules/{abi}/updates/, ahead of the stock modules.\n"
    )


def _maintainer_script(abi: str, actions: str) -> str:
    return f"""#!/bin/sh
set -e
case "$1" in
    {actions})
        if [ -d /lib/modules/{abi} ]; then
            depmod -a {abi}
        fi
        ;;
esac
exit 0
"""


def _scripts(abi: str) -> dict[str, str]:
    return {
        "postinst": _maintainer_script(abi, "configure"),
        "postrm": _maintainer_script(abi, "remove|abort-install|abort-upgrade|disappear"),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stamp_key(
    modules_dir: Path, abi: str, source_version: str, kernel: kernel_packages.KernelSource | None
) -> str:
    h = hashlib.sha256()
    parts = [FORMAT, abi, source_version, _control(abi, source_version, 0), CONFFILE]
    parts += [f"{name}\n{text}" for name, text in sorted(_scripts(abi).items())]
    parts += [f"{m} {_sha256(modules_dir / m)}" for m in MODULES]
    if kernel is not None:
        vmlinuz = kernel.root / "boot" / f"vmlinuz-{kernel.abi}"
        parts += [kernel.abi, kernel.source_version, _sha256(vmlinuz)]
        parts += [_sha256(Path(kernel_packages.__file__))]
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _outputs(
    out: Path, abi: str, source_version: str, kernel: kernel_packages.KernelSource | None
) -> list[Path]:
    repo = out / "repo"
    deb = repo / deb_filename(abi, source_version)
    outputs = [deb, repo / "Packages", repo / "Packages.gz", repo / "Release", out / ISO_NAME]
    if kernel is not None:
        outputs.append(repo / kernel_packages.rpm_filename(kernel))
    return outputs


def build_repo(
    modules_dir: Path,
    abi: str,
    source_version: str,
    out: Path,
    log: Log,
    kernel: kernel_packages.KernelSource | None = None,
) -> Path:
    """Build the packages, the repository out/repo/ and the ISO out/apull-lab.iso; with
    `kernel`, the whole-kernel packages too.

    Returns out/repo. A second call with the same inputs returns at once.
    """
    missing = [m for m in MODULES if not (modules_dir / m).is_file()]
    if missing:
        raise LabError(f"{modules_dir} lacks {', '.join(missing)}; build the modules first")
    out.mkdir(parents=True, exist_ok=True)
    key = _stamp_key(modules_dir, abi, source_version, kernel)
    stamp = out / STAMP
    with (out / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (
            stamp.is_file()
            and stamp.read_text() == key
            and all(p.is_file() for p in _outputs(out, abi, source_version, kernel))
        ):
            log(f"package repository {out / 'repo'} is up to date")
            return out / "repo"
        start = time.monotonic()
        stamp.unlink(missing_ok=True)
        log_file = out / "build.log"
        log_file.write_text(f"# {package_name(abi)} {package_version(source_version)}\n")
        what = package_name(abi) + (" and the kernel packages" if kernel else "")
        log(f"building {what}; log in {log_file}")
        work = out / ".build"
        shutil.rmtree(work, ignore_errors=True)
        repo = work / "repo"
        repo.mkdir(parents=True)
        debs = [repo / deb_filename(abi, source_version)]
        _build_deb(work / "pkg", debs[0], modules_dir, abi, source_version, log_file)
        rpms: list[Path] = []
        if kernel is not None:
            tree = work / "kernel-tree"
            kernel_packages.kernel_tree(kernel, tree)
            debs.append(kernel_packages.build_kernel_deb(kernel, tree, repo, log_file))
            debs.append(kernel_packages.build_broken_deb(kernel, work, repo, log_file))
            rpms.append(kernel_packages.build_kernel_rpm(kernel, tree, work, repo, log_file))
            shutil.rmtree(tree)
        _write_index(repo, debs)
        _make_iso(repo, debs, rpms, work, log_file)
        _replace(out, work)
        shutil.rmtree(work, ignore_errors=True)
        stamp.write_text(key)
        log(f"package repository built in {time.monotonic() - start:.0f} s: {out / 'repo'}")
    return out / "repo"


def _build_deb(
    tree: Path, deb: Path, modules_dir: Path, abi: str, source_version: str, log_file: Path
) -> None:
    updates = tree / "lib/modules" / abi / "updates"
    updates.mkdir(parents=True)
    for name in MODULES:
        shutil.copyfile(modules_dir / name, updates / name)
        (updates / name).chmod(0o644)
    conf = tree / CONFFILE
    conf.parent.mkdir(parents=True)
    # fs_ctl is built into EulerOS kernels; loading it at boot reproduces that.
    conf.write_text("fs_ctl\n")
    conf.chmod(0o644)
    for directory in [tree, *(p for p in tree.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)
    installed_kib = sum((p.stat().st_size + 1023) // 1024 for p in tree.rglob("*") if p.is_file())
    control_dir = tree / "DEBIAN"
    control_dir.mkdir(mode=0o755)
    control_dir.chmod(0o755)
    (control_dir / "control").write_text(_control(abi, source_version, installed_kib))
    (control_dir / "conffiles").write_text(f"/{CONFFILE}\n")
    for name, text in _scripts(abi).items():
        (control_dir / name).write_text(text)
        (control_dir / name).chmod(0o755)
    for name in ("control", "conffiles"):
        (control_dir / name).chmod(0o644)
    run_logged(
        ["dpkg-deb", "--build", "--root-owner-group", "-Zxz", tree, deb],
        log_file,
        "dpkg-deb --build",
    )


def deb_fields(deb: Path) -> list[tuple[str, str]]:
    """The control fields of a .deb, in order; a multi-line value keeps its own lines."""
    text = subprocess.run(
        ["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    fields: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value}\n{line}")
        elif ":" in line:
            name, value = line.split(":", 1)
            fields.append((name, value.strip()))
    return fields


def packages_stanza(deb: Path, filename: str) -> str:
    """The deb's entry in a Packages index, as dpkg-scanpackages writes it."""
    data = deb.read_bytes()
    extra = [
        ("Filename", filename),
        ("Size", str(len(data))),
        ("MD5sum", hashlib.md5(data).hexdigest()),
        ("SHA1", hashlib.sha1(data).hexdigest()),
        ("SHA256", hashlib.sha256(data).hexdigest()),
    ]
    fields = deb_fields(deb)
    late = ("Section", "Priority", "Description")
    ordered = [f for f in fields if f[0] not in late] + extra
    ordered += [f for name in late for f in fields if f[0] == name]
    return "".join(f"{name}: {value}\n" for name, value in ordered) + "\n"


def _write_index(repo: Path, debs: list[Path]) -> None:
    """Packages, Packages.gz and Release of a flat repository holding debs."""
    packages = "".join(packages_stanza(deb, f"./{deb.name}") for deb in debs).encode()
    (repo / "Packages").write_bytes(packages)
    with (
        (repo / "Packages.gz").open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
    ):
        gz.write(packages)
    index = [repo / "Packages", repo / "Packages.gz"]
    lines = [
        "Origin: apull-lab",
        "Label: apull-lab",
        f"Architectures: {ARCH}",
        "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime()),
        "Description: apull lab: on-demand fscache modules for the lab's stock nodes",
    ]
    for field, algo in (("MD5Sum", "md5"), ("SHA1", "sha1"), ("SHA256", "sha256")):
        lines.append(f"{field}:")
        for path in index:
            data = path.read_bytes()
            lines.append(f" {hashlib.new(algo, data).hexdigest()} {len(data)} {path.name}")
    (repo / "Release").write_text("\n".join(lines) + "\n")


def _make_iso(repo: Path, debs: list[Path], rpms: list[Path], work: Path, log_file: Path) -> None:
    """An ISO 9660 (Rock Ridge + Joliet) image laid out like an OS DVD: the RPMs in Packages/
    with their dnf repository in repodata/ (createrepo_c), the apt repository in debian/."""
    dvd = work / "dvd"
    (dvd / ISO_APT_DIR).mkdir(parents=True)
    for path in [*debs, repo / "Packages", repo / "Packages.gz", repo / "Release"]:
        os.link(path, dvd / ISO_APT_DIR / path.name)
    if rpms:
        (dvd / "Packages").mkdir()
        for rpm in rpms:
            os.link(rpm, dvd / "Packages" / rpm.name)
        run_logged(["createrepo_c", "--quiet", dvd], log_file, "createrepo_c")
    cmd: list[str | Path] = ["xorriso", "-as", "mkisofs", "-r", "-J", "-V", ISO_VOLUME]
    cmd += ["-o", work / ISO_NAME, dvd]
    run_logged(cmd, log_file, "xorriso")
    shutil.rmtree(dvd)


def _replace(out: Path, work: Path) -> None:
    """Put the new repo/ and ISO in place of the old ones."""
    old = out / ".repo.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / "repo").exists():
        (out / "repo").rename(old)
    (work / "repo").rename(out / "repo")
    os.replace(work / ISO_NAME, out / ISO_NAME)
    shutil.rmtree(old, ignore_errors=True)


# The HTTP server -----------------------------------------------------------------------------


def server_dir() -> Path:
    return layout.state_dir() / "repo"


def server_log() -> Path:
    """The server's access log (one line per request)."""
    return server_dir() / "access.log"


def _pidfile() -> Path:
    return server_dir() / "server.pid"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((layout.HOST_REGISTRY_ADDR, port), timeout=1):
            return True
    except OSError:
        return False


def ensure_repo_server(
    directory: Path | None = None, port: int | None = None, timeout: float = 15.0
) -> None:
    """Serve directory (default: the lab's repo) over HTTP on 127.0.0.1:port (default:
    layout.HOST_REPO_PORT); a server already running with the same arguments is kept."""
    directory = (directory or layout.repo_dir() / "repo").resolve()
    port = layout.HOST_REPO_PORT if port is None else port
    serving = f"{directory} {port}\n"
    args_file = server_dir() / "serving"
    if (
        processes.is_alive(_pidfile())
        and args_file.is_file()
        and args_file.read_text() == serving
        and _listening(port)
    ):
        return
    stop_repo_server()
    if _listening(port):
        raise LabError(f"another process already listens on {layout.HOST_REGISTRY_ADDR}:{port}")
    if not (directory / "Packages").is_file():
        raise LabError(f"no package repository in {directory}")
    server_dir().mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "http.server", "--bind", layout.HOST_REGISTRY_ADDR,
        "--directory", str(directory), str(port),
    ]  # fmt: skip
    with server_log().open("a") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _pidfile().write_text(f"{proc.pid}\n")
    args_file.write_text(serving)
    deadline = time.monotonic() + timeout
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_repo_server()
            raise LabError(
                f"repository server did not start; last lines of {server_log()}:\n"
                f"{tail(server_log())}"
            )
        time.sleep(0.1)


def stop_repo_server() -> None:
    processes.stop(_pidfile())
    (server_dir() / "serving").unlink(missing_ok=True)
