"""Build the lab's node images: a Debian 12 root file system made once by debootstrap,
then two bootable disk images from it, "stock" (Debian's own kernel modules) and
"ondemand" (cachefiles/erofs rebuilt with on-demand support, plus the fs_ctl gate).

Everything lands in the lab cache (layout.cache_dir()) and is rebuilt only when its inputs
change. Nodes boot from copy-on-write overlays of these images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apull.lab import emulation, layout
from apull.lab.modules import build_ondemand_modules
from apull.lab.run import LabError, Log, run_logged

SUITE = "bookworm"
#: What every node has: systemd, sshd, containerd + runc, Python (and python3-apt) for
#: Ansible, EROFS tools, sudo for non-root operators, and what a kubelet needs beside them
#: (CNI plugins, iptables) when the lab runs Kubernetes.
PACKAGES = (
    "systemd,systemd-sysv,dbus,udev,kmod,openssh-server,containerd,runc,linux-image-amd64,"
    "initramfs-tools,iproute2,procps,netbase,erofs-utils,ca-certificates,python3,psmisc,"
    "fuse3,iputils-ping,sudo,python3-apt,containernetworking-plugins,iptables"
)
#: The `bullseye` variant: a Debian 11 userland (glibc 2.31, python3.9, as RHEL 9 and
#: openEuler 22.03 nodes have) booted on the lab's bookworm kernel with the on-demand
#: modules, and a static containerd built from Debian 12's source (Debian 11 has 1.4).
BULLSEYE = "bullseye"
BULLSEYE_PACKAGES = (
    "systemd,systemd-sysv,dbus,udev,kmod,openssh-server,runc,iproute2,procps,netbase,"
    "erofs-utils,ca-certificates,python3,psmisc,fuse3,iputils-ping,sudo,python3-apt"
)
#: The `arm64` variant: Debian 12 arm64 (aarch64, as the EulerOS fleet runs), booted under
#: qemu-system-aarch64 with its own kernel and the on-demand modules built for it. Its root
#: also carries busybox-static: the lab's arm64 test images are made from it.
ARM64 = "arm64"
ARM64_PACKAGES = PACKAGES.replace("linux-image-amd64", "linux-image-arm64") + ",busybox-static"
#: The `kernel510` variant: Debian 11 on its own stock 5.10 kernel (no on-demand support, as
#: EulerOS before its ISO kernel), booted by GRUB from its disk, with rpm and dnf so that a
#: kernel RPM can be installed from an ISO the way the field does it (the lab has no RPM
#: distribution to build a node from: only Debian's mirror is reachable).
KERNEL510 = "kernel510"
KERNEL510_PACKAGES = BULLSEYE_PACKAGES + ",linux-image-amd64,initramfs-tools,grub-pc,rpm,dnf"
DISK_SIZE = "6G"
#: Disk-booted variants: the root file system is partition 1, from this sector on.
PARTITION_START = 2048
FILES = Path(__file__).with_name("files")
#: Units a lab node does not need; they only slow a software-emulated boot.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer")


@dataclass(frozen=True)
class LabImages:
    """The bootable artefacts of one lab build."""

    directory: Path
    kernel: Path
    initrd: Path
    abi: str

    def disk(self, variant: str) -> Path:
        return self.directory / f"{variant}.raw"

    def boot_files(self, variant: str) -> tuple[Path, Path] | None:
        """(kernel, initrd) QEMU boots a node of `variant` with (the arm64 variant has its
        own), or None when its disk's boot loader chooses the kernel."""
        if variant in layout.DISK_BOOTED:
            return None
        if variant == ARM64:
            return self.directory / "vmlinuz-arm64", self.directory / "initrd-arm64.img"
        return self.kernel, self.initrd


def debian_mirror() -> str:
    """The Debian mirror this machine is configured with (read, never hard-coded)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                return parts[1]
    raise LabError("no Debian mirror found in /etc/apt/sources.list.d/debian.sources")


def rootfs_path(suite: str = SUITE, arch: str = "amd64", flavour: str = "") -> Path:
    """Where the root of `suite` for `arch` lives in the cache:
    rootfs[-SUITE][-ARCH][-FLAVOUR] (a flavour: another package set of the same suite)."""
    name = "rootfs" if suite == SUITE else f"rootfs-{suite}"
    name = name if arch == "amd64" else f"{name}-{arch}"
    return layout.cache_dir() / (f"{name}-{flavour}" if flavour else name)


def ensure_rootfs(
    log: Log, suite: str = SUITE, packages: str = PACKAGES, arch: str = "amd64", flavour: str = ""
) -> Path:
    """Debootstrap a root file system once (rootfs, rootfs-SUITE or rootfs-ARCH); kept in the
    cache. Another architecture's is made, and later used, through qemu-user-static."""
    cache = layout.cache_dir()
    rootfs = rootfs_path(suite, arch, flavour)
    name = rootfs.name
    emulation.ensure_emulation(arch, log)
    stamp = cache / f"{name}.packages"
    if rootfs.is_dir() and stamp.exists() and stamp.read_text() == packages:
        return rootfs
    tmp = cache / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    slow = "" if arch == emulation.host_arch() else ", emulated"
    log(f"debootstrap {suite} {arch} into {rootfs} (a few minutes{slow}, once)")
    run_logged(
        ["debootstrap", f"--arch={arch}", "--variant=minbase", f"--include={packages}", suite,
         tmp, debian_mirror()],
        cache / f"debootstrap-{name}.log",
        f"debootstrap {suite} {arch}",
    )  # fmt: skip
    run_logged(["chroot", tmp, "apt-get", "clean"], cache / f"debootstrap-{name}.log",
               "apt-get clean")  # fmt: skip
    tmp.rename(rootfs)
    stamp.write_text(packages)
    return rootfs


def ensure_ssh_key() -> Path:
    key = layout.ssh_key_path()
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "apull-lab", "-f", str(key)],
            check=True,
        )
    return key


def kernel_abi(rootfs: Path) -> str:
    abis = sorted(p.name for p in (rootfs / "lib/modules").iterdir() if p.is_dir())
    if len(abis) != 1:
        raise LabError(f"expected one kernel in {rootfs}/lib/modules, found {abis}")
    return abis[0]


def _tree_digest(*roots: Path) -> str:
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(oct(path.stat().st_mode).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _hosts_file() -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        f"{layout.GUEST_REGISTRY_ADDR}\t{layout.REGISTRY_NAME}",
        f"{layout.GUEST_REPO_ADDR}\t{layout.REPO_NAME}",
    ]
    for index in range(1, layout.MAX_NODES + 1):
        lines.append(f"{layout.node_lan_addr(index)}\t{layout.node_name(index)}")
    return "\n".join(lines) + "\n"


def _customise(stage: Path, pubkey: Path, log_path: Path) -> None:
    """Turn a copy of the base root file system into a lab node image tree."""
    shutil.copytree(FILES / "rootfs", stage, symlinks=True, dirs_exist_ok=True)
    (stage / "etc/hosts").write_text(_hosts_file())
    (stage / "etc/hostname").write_text("apull-lab\n")
    ssh_dir = stage / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(pubkey.read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    for key in (stage / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (stage / "etc/machine-id").write_text("")
    (stage / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    run_logged(
        ["systemctl", f"--root={stage}", "enable", "apull-lab-init.service",
         "systemd-networkd.service", "ssh.service", "containerd.service"],
        log_path, "enable lab units",
    )  # fmt: skip
    run_logged(["systemctl", f"--root={stage}", "mask", *MASKED_UNITS], log_path, "mask units")


def _add_ondemand_modules(stage: Path, abi: str, modules: Path, log_path: Path) -> None:
    updates = stage / "lib/modules" / abi / "updates"
    updates.mkdir(parents=True, exist_ok=True)
    for ko in ("cachefiles.ko", "erofs.ko", "fs_ctl.ko"):
        shutil.copy2(modules / ko, updates / ko)
    # fs_ctl is built into EulerOS kernels; loading it at boot reproduces that.
    (stage / "etc/modules-load.d/fs_ctl.conf").write_text("fs_ctl\n")
    run_logged(["chroot", stage, "depmod", abi], log_path, "depmod")


def _make_disk(stage: Path, disk: Path, log_path: Path) -> None:
    tmp = disk.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run_logged(["truncate", "-s", DISK_SIZE, tmp], log_path, "truncate")
    run_logged(
        ["mkfs.ext4", "-q", "-F", "-L", "apull-root", "-d", stage, tmp], log_path, "mkfs.ext4"
    )
    tmp.rename(disk)


def _add_static_containerd(stage: Path, rootfs: Path, binaries: Path) -> None:
    """The static containerd, with the unit and default config of Debian 12's package."""
    for name in ("containerd", "containerd-shim-runc-v2", "ctr"):
        shutil.copy2(binaries / name, stage / "usr/bin" / name)
    shutil.copy2(rootfs / "lib/systemd/system/containerd.service",
                 stage / "lib/systemd/system/containerd.service")  # fmt: skip
    (stage / "etc/containerd").mkdir(exist_ok=True)
    shutil.copy2(rootfs / "etc/containerd/config.toml", stage / "etc/containerd/config.toml")


def _build_variant_disk(
    images: LabImages,
    variant: str,
    base: Path,
    inputs: str,
    fill: Callable[[Path, Path], None],
    log: Log,
    make_disk: Callable[[Path, Path, Path], None] = _make_disk,
) -> None:
    """A variant's disk in the build directory, with its own marker: a copy of `base`, made
    into a node by `fill(stage, log_path)`, written out by `make_disk(stage, disk, log_path)`;
    skipped when the marker holds these inputs."""
    marker = images.directory / f"{variant}.complete"
    if marker.exists() and marker.read_text() == inputs:
        return
    log_path = images.directory / f"build-{variant}.log"
    stage = images.directory.with_name(images.directory.name + f".{variant}.stage")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        run_logged(["cp", "-a", "--reflink=auto", base, stage], log_path, "copy rootfs")
        fill(stage, log_path)
        make_disk(stage, images.disk(variant), log_path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    marker.write_text(inputs)


def _recipe() -> str:
    """How the variants are put together: this file."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _build_bullseye_disk(images: LabImages, rootfs: Path, modules: Path, log: Log) -> None:
    """The bullseye variant's disk: Debian 11's userland on the lab's bookworm kernel."""
    from apull.lab.containerd_build import ensure_static_containerd  # it reads our mirror

    cache = layout.cache_dir()
    base = ensure_rootfs(log, BULLSEYE, BULLSEYE_PACKAGES)
    containerd = ensure_static_containerd(
        rootfs, cache / "containerd-buildroot", cache / "containerd-static", log
    )
    key = ensure_ssh_key().with_suffix(".pub")
    inputs = "\n".join(
        [BULLSEYE_PACKAGES, _tree_digest(FILES / "rootfs", modules, containerd), key.read_text(),
         _recipe()]
    )  # fmt: skip

    def fill(stage: Path, log_path: Path) -> None:
        log(f"building the {BULLSEYE} node image (Debian 11 userland, kernel {images.abi})")
        # Debian 11 has no kernel of its own here: the lab's bookworm one and its modules.
        (stage / "lib/modules").mkdir(parents=True, exist_ok=True)
        run_logged(
            ["cp", "-a", rootfs / "lib/modules" / images.abi, stage / "lib/modules/"],
            log_path,
            "copy the kernel's modules",
        )
        _add_static_containerd(stage, rootfs, containerd)
        _customise(stage, key, log_path)
        _add_ondemand_modules(stage, images.abi, modules, log_path)

    _build_variant_disk(images, BULLSEYE, base, inputs, fill, log)


def _build_arm64_disk(images: LabImages, log: Log) -> None:
    """The arm64 variant's disk, kernel and initrd: Debian 12 arm64 with the on-demand
    modules built for its kernel in an arm64 build chroot (emulated: several minutes, once)."""
    cache = layout.cache_dir()
    base = ensure_rootfs(log, SUITE, ARM64_PACKAGES, ARM64)
    abi = kernel_abi(base)
    modules = build_ondemand_modules(base, cache / f"buildroot-{ARM64}", cache / "modules", log)
    key = ensure_ssh_key().with_suffix(".pub")
    inputs = "\n".join(
        [ARM64_PACKAGES, abi, _tree_digest(FILES / "rootfs", modules), key.read_text(),
         _hosts_file(), _recipe()]
    )  # fmt: skip

    def fill(stage: Path, log_path: Path) -> None:
        log(f"building the {ARM64} node image (Debian 12 arm64, kernel {abi})")
        boot = images.boot_files(ARM64)
        assert boot is not None, "the arm64 variant boots QEMU's -kernel"
        kernel, initrd = boot
        _customise(stage, key, log_path)
        shutil.copy2(stage / "boot" / f"vmlinuz-{abi}", kernel)
        shutil.copy2(stage / "boot" / f"initrd.img-{abi}", initrd)
        _add_ondemand_modules(stage, abi, modules, log_path)

    _build_variant_disk(images, ARM64, base, inputs, fill, log)


#: GRUB settings of the disk-booted nodes: its menu and the kernel's console on the serial
#: port (the node's serial.log), a one-second menu, the lab's interface names.
GRUB_LAB_DEFAULTS = """\
# apull lab: GRUB's menu and the kernel's console on the serial port (serial.log), a short
# menu, eth0/eth1 as the lab's network units name them.
GRUB_TIMEOUT=1
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_CMDLINE_LINUX="console=ttyS0 net.ifnames=0"
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_DISABLE_OS_PROBER=true
"""
#: Where GRUB's core image finds its modules and grub.cfg: partition 1 of the first disk.
GRUB_PREFIX = "(hd0,msdos1)/boot/grub"
#: Offsets in GRUB's boot.img that grub-bios-setup patches (grub/i386/pc/boot.h).
_BOOT_KERNEL_SECTOR = 0x5C
_BOOT_DRIVE_CHECK = 0x66
_MBR_CODE = 440


def _first_menu(abi: str) -> str:
    """The grub.cfg a disk-booted image starts with: its one kernel. (update-grub, run by the
    kernel role or a kernel package on the node, writes the real one: grub-mkconfig cannot
    probe a root that is not mounted from a disk.)"""
    return f"""\
# apull lab: the image's first menu. update-grub on the node replaces it.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set default=0
set timeout=1
menuentry 'Debian GNU/Linux, with Linux {abi}' {{
\tinsmod part_msdos
\tinsmod ext2
\tset root=(hd0,msdos1)
\tlinux /boot/vmlinuz-{abi} root=/dev/vda1 ro console=ttyS0 net.ifnames=0 quiet
\tinitrd /boot/initrd.img-{abi}
}}
"""


def _add_grub(stage: Path, abi: str, log_path: Path) -> None:
    """GRUB for BIOS in the image as grub-install would put it there: its modules in
    /boot/grub/i386-pc, a core image that reads them from partition 1, the lab's defaults
    and a first menu."""
    lib = stage / "usr/lib/grub/i386-pc"
    target = stage / "boot/grub/i386-pc"
    target.mkdir(parents=True, exist_ok=True)
    for path in lib.iterdir():
        if path.suffix in (".mod", ".lst"):
            shutil.copy2(path, target / path.name)
    run_logged(
        ["chroot", stage, "grub-mkimage", "-O", "i386-pc", "-o", "/boot/grub/i386-pc/core.img",
         "-p", GRUB_PREFIX, "biosdisk", "part_msdos", "ext2"],
        log_path, "grub-mkimage",
    )  # fmt: skip
    (stage / "etc/default/grub.d").mkdir(parents=True, exist_ok=True)
    (stage / "etc/default/grub.d/10-apull-lab.cfg").write_text(GRUB_LAB_DEFAULTS)
    (stage / "boot/grub/grub.cfg").write_text(_first_menu(abi))
    (stage / "etc/fstab").write_text("/dev/vda1 / ext4 defaults,noatime 0 1\n")


def _partition_table(start: int, sectors: int) -> bytes:
    """Bytes 440-511 of an MBR: a disk signature, one bootable Linux partition (LBA only)
    and the boot signature."""
    lba_only = b"\xfe\xff\xff"  # CHS fields beyond 8 GiB's reach: use the LBA fields
    entry = b"\x80" + lba_only + b"\x83" + lba_only
    entry += start.to_bytes(4, "little") + sectors.to_bytes(4, "little")
    return b"APUL\0\0" + entry + bytes(16 * 3) + b"\x55\xaa"


def _make_boot_disk(stage: Path, disk: Path, log_path: Path) -> None:
    """A disk with an MBR partition table, the root file system as partition 1 and GRUB (the
    stage's boot.img and core.img) in the MBR and in the gap before the partition, where
    grub-install embeds it."""
    sector = 512
    boot = (stage / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    core = (stage / "boot/grub/i386-pc/core.img").read_bytes()
    if len(core) > (PARTITION_START - 1) * sector:
        raise LabError(f"GRUB's core image ({len(core)} bytes) does not fit before the partition")
    tmp = disk.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run_logged(["truncate", "-s", DISK_SIZE, tmp], log_path, "truncate")
    total = tmp.stat().st_size // sector
    size_kib = (total - PARTITION_START) * sector // 1024
    run_logged(
        ["mkfs.ext4", "-q", "-F", "-L", "apull-root", "-E", f"offset={PARTITION_START * sector}",
         "-d", stage, tmp, f"{size_kib}k"],
        log_path, "mkfs.ext4",
    )  # fmt: skip
    mbr = bytearray(boot[:_MBR_CODE])
    mbr[_BOOT_KERNEL_SECTOR : _BOOT_KERNEL_SECTOR + 8] = (1).to_bytes(8, "little")
    mbr[_BOOT_DRIVE_CHECK : _BOOT_DRIVE_CHECK + 2] = b"\x90\x90"  # a disk, never a floppy
    mbr += _partition_table(PARTITION_START, total - PARTITION_START)
    with tmp.open("r+b") as raw:
        raw.write(mbr)
        raw.seek(sector)
        raw.write(core)
    tmp.rename(disk)


def _build_kernel510_disk(images: LabImages, rootfs: Path, log: Log) -> None:
    """The kernel510 variant's disk: Debian 11 with its stock 5.10 kernel, GRUB, rpm/dnf and
    the static containerd; GRUB on the disk boots it."""
    from apull.lab.containerd_build import ensure_static_containerd  # it reads our mirror

    cache = layout.cache_dir()
    base = ensure_rootfs(log, BULLSEYE, KERNEL510_PACKAGES, flavour=KERNEL510)
    abi = kernel_abi(base)
    containerd = ensure_static_containerd(
        rootfs, cache / "containerd-buildroot", cache / "containerd-static", log
    )
    key = ensure_ssh_key().with_suffix(".pub")
    inputs = "\n".join(
        [KERNEL510_PACKAGES, abi, _tree_digest(FILES / "rootfs", containerd), key.read_text(),
         _hosts_file(), _recipe()]
    )  # fmt: skip

    def fill(stage: Path, log_path: Path) -> None:
        log(f"building the {KERNEL510} node image (Debian 11, its kernel {abi}, GRUB)")
        _add_static_containerd(stage, rootfs, containerd)
        _customise(stage, key, log_path)
        _add_grub(stage, abi, log_path)

    _build_variant_disk(images, KERNEL510, base, inputs, fill, log, _make_boot_disk)


def _build_variants(images: LabImages, rootfs: Path, modules: Path, variants: frozenset[str],
                    log: Log) -> None:  # fmt: skip
    """The disks of the variants built only when a node asks for them."""
    if BULLSEYE in variants:
        _build_bullseye_disk(images, rootfs, modules, log)
    if ARM64 in variants:
        _build_arm64_disk(images, log)
    if KERNEL510 in variants:
        _build_kernel510_disk(images, rootfs, log)


def build_images(log: Log, variants: frozenset[str] = frozenset()) -> LabImages:
    """Make sure the node images exist for the current inputs; return where they are.

    "stock" and "ondemand" are always built; "bullseye" and "arm64" when `variants` names
    them."""
    cache = layout.cache_dir()
    rootfs = ensure_rootfs(log)
    key = ensure_ssh_key()
    abi = kernel_abi(rootfs)
    modules = build_ondemand_modules(rootfs, cache / "buildroot", cache / "modules", log)
    build_id = hashlib.sha256(
        "\n".join(
            [
                PACKAGES,
                _tree_digest(FILES / "rootfs", modules),
                key.with_suffix(".pub").read_text(),
                _hosts_file(),
            ]
        ).encode()
    ).hexdigest()[:16]
    out = cache / "images" / build_id
    images = LabImages(out, out / "vmlinuz", out / "initrd.img", abi)
    if (out / "complete").exists():
        _build_variants(images, rootfs, modules, variants, log)
        return images
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_path = out / "build.log"
    stage = out.with_name(out.name + ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    log(f"building node images {build_id} (kernel {abi})")
    try:
        run_logged(["cp", "-a", "--reflink=auto", rootfs, stage], log_path, "copy rootfs")
        _customise(stage, key.with_suffix(".pub"), log_path)
        shutil.copy2(stage / "boot" / f"vmlinuz-{abi}", images.kernel)
        shutil.copy2(stage / "boot" / f"initrd.img-{abi}", images.initrd)
        _make_disk(stage, images.disk("stock"), log_path)
        _add_ondemand_modules(stage, abi, modules, log_path)
        _make_disk(stage, images.disk("ondemand"), log_path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    (out / "complete").write_text(build_id + "\n")
    _prune_old_builds(out)
    _build_variants(images, rootfs, modules, variants, log)
    return images


#: Builds kept besides the current one: another lab sharing the cache may still boot from
#: them (this lab only knows its own nodes).
KEEP_OLD_BUILDS = 2


def _prune_old_builds(keep: Path) -> None:
    """Remove old builds beyond the newest few, unless this lab's nodes still use them."""
    in_use = {
        Path(os.readlink(link)).resolve()
        for link in layout.state_dir().glob("nodes/*/image")
        if link.is_symlink()
    }
    builds = sorted(
        (b for b in keep.parent.iterdir() if b.is_dir() and (b / "complete").exists()),
        key=lambda b: (b / "complete").stat().st_mtime,
        reverse=True,
    )
    for build in builds[1 + KEEP_OLD_BUILDS :]:
        if build.resolve() not in in_use and build != keep:
            shutil.rmtree(build, ignore_errors=True)
