"""A whole kernel as packages, for the lab's nodes that change kernel release.

The `kernel510` nodes run Debian 11's stock 5.10 kernel, without on-demand support. Their
upgrade is a kernel of another release: Debian 12's 6.1 (the lab's own nodes' kernel) with
cachefiles/erofs rebuilt for on-demand support and the fs_ctl gate, packaged three ways:

- ``apull-lab-kernel`` (.deb) for the apt repository and the ISO's ``debian/`` directory;
- ``kernel`` (.rpm, built with rpmbuild) for the ISO's ``Packages/`` and ``repodata/``, laid
  out like an OS DVD, installed by dnf (``--repofrompath``) as the field installs EulerOS's;
- ``apull-lab-kernel-broken`` (.deb), DELIBERATELY BROKEN for the rollout tests: the same
  kernel image without an initramfs or modules, so it cannot find its root file system and
  panics at boot.

Both good packages hold the same files: the kernel image, its config and System.map, its
modules (less the drivers for hardware a lab VM does not have: sound, GPUs, cameras,
wireless, InfiniBand, ...), the rebuilt modules in ``updates/`` and the boot-time load of
fs_ctl. Their scripts run depmod and the system's kernel hooks (Debian's
/etc/kernel/postinst.d: the initramfs and update-grub; ``kernel-install`` on the RPM family).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from apull.lab.modules import MODULES
from apull.lab.run import LabError, run_logged

DEB_NAME = "apull-lab-kernel"
BROKEN_NAME = "apull-lab-kernel-broken"
RPM_NAME = "kernel"
REVISION = "apull1"
MAINTAINER = "apull lab <apull-lab@localhost>"
FS_CTL_CONF = "etc/modules-load.d/apull-fs-ctl.conf"
#: Module directories left out: drivers for hardware a lab VM does not have.
HARDWARE_DIRS = (
    "kernel/sound",
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/infiniband",
    "kernel/drivers/iio",
    "kernel/drivers/staging",
    "kernel/drivers/net/wireless",
    "kernel/drivers/net/ethernet",
    "kernel/drivers/bluetooth",
    "kernel/drivers/isdn",
    "kernel/net/bluetooth",
    "kernel/net/mac80211",
    "kernel/net/wireless",
)
#: Files depmod writes on the node: not shipped (they would list the left-out modules).
DEPMOD_OUTPUTS = (
    "modules.alias",
    "modules.alias.bin",
    "modules.builtin.alias.bin",
    "modules.builtin.bin",
    "modules.dep",
    "modules.dep.bin",
    "modules.devname",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
)
#: Timestamps of every packaged file, so that the same inputs give the same packages.
EPOCH = 1_700_000_000


@dataclass(frozen=True)
class KernelSource:
    """The kernel to package: a root holding it (the lab's Debian 12 root), its release, the
    Debian version it came from, and the rebuilt on-demand modules for it."""

    root: Path
    abi: str
    source_version: str
    modules: Path

    @property
    def upstream(self) -> str:
        """6.1.158 of 6.1.158-1: the RPM Version."""
        return self.source_version.split(":", 1)[-1].split("-", 1)[0]

    @property
    def debian_revision(self) -> str:
        return self.source_version.split(":", 1)[-1].partition("-")[2] or "0"

    @property
    def deb_version(self) -> str:
        return f"{self.source_version}+{REVISION}"

    @property
    def rpm_release(self) -> str:
        return f"{self.debian_revision}.{REVISION}"

    @property
    def broken_release(self) -> str:
        """The broken kernel's release (its /boot/vmlinuz-RELEASE)."""
        return f"{self.abi}-broken"


def deb_filename(name: str, version: str) -> str:
    return f"{name}_{version.split(':', 1)[-1]}_amd64.deb"


def rpm_filename(src: KernelSource) -> str:
    return f"{RPM_NAME}-{src.upstream}-{src.rpm_release}.x86_64.rpm"


def kernel_tree(src: KernelSource, tree: Path) -> None:
    """The installed files of the good kernel packages, under tree."""
    for name in ("vmlinuz", "config", "System.map"):
        source = src.root / "boot" / f"{name}-{src.abi}"
        if not source.is_file():
            raise LabError(f"{source} is missing: the kernel to package is incomplete")
        (tree / "boot").mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, tree / "boot" / source.name)
    modules_root = src.root / "lib/modules" / src.abi
    skipped = {modules_root / d for d in HARDWARE_DIRS}

    def ignore(directory: str, names: list[str]) -> list[str]:
        here = Path(directory)
        out = [n for n in names if here / n in skipped or (here / n).is_symlink()]
        if here == modules_root:
            out += [n for n in names if n in DEPMOD_OUTPUTS]
        return out

    shutil.copytree(modules_root, tree / "lib/modules" / src.abi, ignore=ignore, symlinks=True)
    updates = tree / "lib/modules" / src.abi / "updates"
    updates.mkdir(exist_ok=True)
    for name in MODULES:
        shutil.copyfile(src.modules / name, updates / name)
    conf = tree / FS_CTL_CONF
    conf.parent.mkdir(parents=True, exist_ok=True)
    # fs_ctl is built into EulerOS kernels; loading it at boot reproduces that.
    conf.write_text("fs_ctl\n")
    _normalise(tree)


def _normalise(tree: Path) -> None:
    """Modes and timestamps that depend only on the content."""
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() else 0o644)
    for path in [*tree.rglob("*"), tree]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)


def _hooks(abi: str, action: str) -> str:
    """What a kernel package runs after install ("postinst") or removal ("postrm"): depmod,
    then the system's kernel hooks (Debian's initramfs and update-grub, or kernel-install)."""
    install = action == "postinst"
    kernel_install = f"kernel-install {'add' if install else 'remove'} {abi}"
    if install:
        kernel_install += f" /boot/vmlinuz-{abi}"
    return (
        (f"depmod -a {abi}\n" if install else "")
        + f"if [ -d /etc/kernel/{action}.d ]; then\n"
        + f"    run-parts --report --exit-on-error --arg={abi} --arg=/boot/vmlinuz-{abi} "
        + f"/etc/kernel/{action}.d\n"
        + "elif command -v kernel-install >/dev/null 2>&1; then\n"
        + f"    {kernel_install}\n"
        + "fi\n"
    )


def _update_grub() -> str:
    return "if command -v update-grub >/dev/null 2>&1 && [ -e /boot/grub/grub.cfg ]; then\n" \
        "    update-grub\nfi\n"  # fmt: skip


def _deb(
    tree: Path,
    out: Path,
    control: dict[str, str],
    scripts: dict[str, str],
    conffiles: list[str],
    log_file: Path,
) -> Path:
    installed_kib = sum((p.stat().st_size + 1023) // 1024 for p in tree.rglob("*") if p.is_file())
    debian = tree / "DEBIAN"
    debian.mkdir()
    fields = {**control, "Installed-Size": str(installed_kib)}
    text = "".join(f"{k}: {v}\n" for k, v in fields.items() if k != "Description")
    (debian / "control").write_text(text + f"Description: {control['Description']}\n")
    if conffiles:
        (debian / "conffiles").write_text("".join(f"/{c}\n" for c in conffiles))
    for name, body in scripts.items():
        (debian / name).write_text("#!/bin/sh\nset -e\n" + body + "exit 0\n")
        (debian / name).chmod(0o755)
    for path in debian.iterdir():
        if path.name not in scripts:
            path.chmod(0o644)
    debian.chmod(0o755)
    deb = out / deb_filename(control["Package"], control["Version"])
    run_logged(
        ["dpkg-deb", "--build", "--root-owner-group", "-Zgzip", "-z6", tree, deb],
        log_file, f"dpkg-deb --build {deb.name}",
        env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)},
    )  # fmt: skip
    shutil.rmtree(debian)
    return deb


def build_kernel_deb(src: KernelSource, tree: Path, out: Path, log_file: Path) -> Path:
    """apull-lab-kernel: the kernel of `tree` (made by kernel_tree) as a Debian package."""
    control = {
        "Package": DEB_NAME,
        "Version": src.deb_version,
        "Architecture": "amd64",
        "Maintainer": MAINTAINER,
        "Provides": f"linux-image-{src.abi}",
        "Conflicts": f"apull-ondemand-modules-{src.abi}",
        "Replaces": f"apull-ondemand-modules-{src.abi}",
        "Section": "kernel",
        "Priority": "optional",
        "Description": f"Linux {src.abi} with fscache on-demand support, for the apull lab\n"
        f" Debian's linux {src.source_version} kernel and modules, cachefiles and erofs rebuilt\n"
        " with CONFIG_CACHEFILES_ONDEMAND and CONFIG_EROFS_FS_ONDEMAND, and the fs_ctl gate\n"
        " loaded at boot. Drivers for hardware a lab VM lacks are left out.",
    }
    scripts = {"postinst": _hooks(src.abi, "postinst"), "postrm": _hooks(src.abi, "postrm")}
    scripts["postrm"] = 'case "$1" in remove|purge)\n' + scripts["postrm"] + ";;\nesac\n"
    return _deb(tree, out, control, scripts, [FS_CTL_CONF], log_file)


def build_broken_deb(src: KernelSource, work: Path, out: Path, log_file: Path) -> Path:
    """apull-lab-kernel-broken: DELIBERATELY BROKEN (no initramfs, no modules), for tests."""
    tree = work / "broken"
    (tree / "boot").mkdir(parents=True)
    shutil.copy2(src.root / "boot" / f"vmlinuz-{src.abi}",
                 tree / "boot" / f"vmlinuz-{src.broken_release}")  # fmt: skip
    _normalise(tree)
    control = {
        "Package": BROKEN_NAME,
        "Version": src.deb_version,
        "Architecture": "amd64",
        "Maintainer": MAINTAINER,
        "Section": "kernel",
        "Priority": "optional",
        "Description": "DELIBERATELY BROKEN kernel for the apull lab's rollout tests\n"
        f" Linux {src.abi}'s image as {src.broken_release}, with no initramfs and no\n"
        " modules: it cannot find its root file system and panics at boot.",
    }
    scripts = {"postinst": _update_grub(), "postrm": _update_grub()}
    return _deb(tree, out, control, scripts, [], log_file)


def _spec(src: KernelSource, tree: Path) -> str:
    return f"""\
%define _build_id_links none
%define debug_package %{{nil}}
%define __spec_install_post %{{nil}}
%define __os_install_post %{{nil}}
%define _binary_payload w6.gzdio
%define use_source_date_epoch_as_buildtime 1
%define clamp_mtime_to_source_date_epoch 1
%define _buildhost apull-lab

Name: {RPM_NAME}
Version: {src.upstream}
Release: {src.rpm_release}
Summary: Linux {src.abi} with fscache on-demand support, for the apull lab
License: GPL-2.0-only
Packager: {MAINTAINER}
AutoReqProv: no
Provides: installonlypkg(kernel)

%description
Debian's linux {src.source_version} kernel and modules, cachefiles and erofs rebuilt with
CONFIG_CACHEFILES_ONDEMAND and CONFIG_EROFS_FS_ONDEMAND, and the fs_ctl gate loaded at boot,
packaged as an OS ISO's kernel RPM for the apull lab.

%install
mkdir -p %{{buildroot}}
cp -a {tree}/. %{{buildroot}}/

%post -p <lua>
{_lua_shell(_hooks(src.abi, "postinst"), "the kernel install hooks")}
%postun -p <lua>
if arg[2] == 0 then
{_lua_shell(_hooks(src.abi, "postrm"), "the kernel removal hooks")}
end

%files
/boot/vmlinuz-{src.abi}
/boot/config-{src.abi}
/boot/System.map-{src.abi}
/lib/modules/{src.abi}
%config(noreplace) /{FS_CTL_CONF}
"""


def _lua_shell(script: str, what: str) -> str:
    """A Lua scriptlet line running `script` through /bin/sh (C's system()). A shell
    scriptlet would make the RPM require /bin/sh, which no package provides in the rpm
    database of a node whose userland came from dpkg."""
    return f'if not os.execute([[\n{script}]]) then error("{what} failed") end'


def build_kernel_rpm(src: KernelSource, tree: Path, work: Path, out: Path, log_file: Path) -> Path:
    """The `kernel` RPM of `tree`, built by rpmbuild (AutoReqProv off and Lua scriptlets: it
    is installed on a Debian userland whose packages rpm does not know)."""
    top = work / "rpmbuild"
    (top / "SPECS").mkdir(parents=True)
    spec = top / "SPECS" / "kernel.spec"
    spec.write_text(_spec(src, tree))
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
    run_logged(
        ["rpmbuild", "-bb", "--quiet", "--target", "x86_64", "--define", f"_topdir {top}",
         "--define", f"_dbpath {work / 'rpmdb'}", spec],
        log_file, "rpmbuild", env=env,
    )  # fmt: skip
    built = top / "RPMS" / "x86_64" / rpm_filename(src)
    if not built.is_file():
        raise LabError(f"rpmbuild made no {built.name}; see {log_file}")
    # rpmbuild reports a scriptlet it cannot parse, then builds the package without it.
    scripts = subprocess.run(
        ["rpm", "-qp", "--qf", "%{POSTIN}\n%{POSTUN}", str(built)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if scripts.count("os.execute") != 2:
        raise LabError(f"rpmbuild left the scriptlets out of {built.name}; see {log_file}")
    target = out / built.name
    shutil.move(built, target)
    return target
