"""Programs of another architecture on this machine: Debian's architecture names, and
qemu-user-static's binfmt_misc registration for the lab's arm64 roots (the arm64 node image,
its module build chroot, the Debian 11 arm64 test root)."""

from __future__ import annotations

import platform
from pathlib import Path

from apull.lab import layout
from apull.lab.run import LabError, Log, run_logged

#: Debian's architecture names -> `uname -m` (and the wheels' platform tags).
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def host_arch() -> str:
    """This machine's architecture as Debian names it."""
    return next(deb for deb, machine in MACHINES.items() if machine == platform.machine())


def ensure_emulation(arch: str, log: Log) -> None:
    """Programs of `arch` run here: natively, or through qemu-user-static's binfmt_misc
    registration (Debian's line from /usr/lib/binfmt.d, flag F: the interpreter is opened
    once, so it works inside a chroot), registered when missing."""
    if arch == host_arch():
        return
    machine = MACHINES[arch]
    if not (BINFMT / "register").exists():
        run_logged(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT],
                   layout.cache_dir() / "binfmt.log", "mount binfmt_misc")  # fmt: skip
    if (BINFMT / f"qemu-{machine}").exists():
        return
    line = Path(f"/usr/lib/binfmt.d/qemu-{machine}.conf")
    if not line.exists():
        raise LabError(f"{line} is missing: install qemu-user-static (make deps)")
    log(f"registering qemu-user-static for {machine} programs (binfmt_misc)")
    (BINFMT / "register").write_text(line.read_text().strip())
