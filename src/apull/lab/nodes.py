"""Lab nodes: QEMU software-emulated VMs booted from copy-on-write overlays of the lab images.

Each node has two NICs: a user-mode one (ssh from the host on 127.0.0.1:PORT, the registry and
the package repository forwarded to it, nothing else reachable) and one on the lab's VDE switch
(the private network the nodes share).
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from apull.lab import emulation, layout, processes
from apull.lab.image import LabImages
from apull.lab.package_repo import ISO_NAME
from apull.lab.run import LabError, run_logged

MEMORY_MB = 1024
SSH_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=5",
)  # fmt: skip


def switch_dir() -> Path:
    return layout.state_dir() / "switch"


def ensure_switch() -> None:
    """Start the lab's VDE switch (a Unix socket; no host network changes)."""
    sw = switch_dir()
    pidfile = layout.state_dir() / "switch.pid"
    if processes.is_alive(pidfile) and (sw / "ctl").exists():
        return
    processes.stop(pidfile, program="vde_switch")
    pidfile.unlink(missing_ok=True)
    # A switch that died (or a host that rebooted) leaves its socket directory behind, and
    # vde_switch does not reliably take over a stale one: start from an empty directory.
    shutil.rmtree(sw, ignore_errors=True)
    sw.parent.mkdir(parents=True, exist_ok=True)
    log = layout.state_dir() / "switch.log"
    run_logged(
        ["vde_switch", "--sock", sw, "--mode", "600", "--daemon", "--pidfile", pidfile],
        log,
        "vde_switch",
    )
    if not (sw / "ctl").exists():
        raise LabError(f"vde_switch started but {sw}/ctl is missing; see {log}")


def stop_switch() -> None:
    processes.stop(layout.state_dir() / "switch.pid", program="vde_switch")


@dataclass(frozen=True)
class NodeDir:
    """The files of one running (or stopped) node."""

    node: layout.LabNode

    @property
    def path(self) -> Path:
        return layout.state_dir() / "nodes" / self.node.name

    @property
    def pidfile(self) -> Path:
        return self.path / "qemu.pid"

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def serial_log(self) -> Path:
        return self.path / "serial.log"

    @property
    def image_link(self) -> Path:
        return self.path / "image"

    @property
    def variant_file(self) -> Path:
        return self.path / "variant"

    @property
    def monitor(self) -> Path:
        """QEMU's QMP socket (qmp.py)."""
        return self.path / "qmp.sock"

    def running(self) -> bool:
        return processes.is_alive(self.pidfile)

    def matches(self, images: LabImages) -> bool:
        """True if the node was made from these images in the wanted variant."""
        try:
            return (
                self.image_link.resolve() == images.directory.resolve()
                and self.variant_file.read_text().strip() == self.node.variant
            )
        except FileNotFoundError:
            return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((layout.HOST_REGISTRY_ADDR, port))
        except OSError:
            return False
    return True


#: How each kind of node is emulated: (qemu binary, machine and CPU options, console).
#: arm64: the `virt` board with the newest CPU QEMU models, its pointer authentication
#: computed with QEMU's cheap algorithm instead of QARMA (much faster under TCG).
_MACHINES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "x86_64": ("qemu-system-x86_64", ("-cpu", "max"), "ttyS0"),
    "aarch64": (
        "qemu-system-aarch64",
        ("-machine", "virt", "-cpu", "max,pauth-impdef=on"),
        "ttyAMA0",
    ),
}


#: The fw_cfg item a disk-booted node reads its identity from (the apull_lab.* arguments).
IDENTITY_FW_CFG = "opt/apull_lab/cmdline"


def node_machine(node: layout.LabNode) -> str:
    """The node's `uname -m`."""
    return emulation.MACHINES[layout.variant_arch(node.variant)]


def qemu_command(nd: NodeDir, images: LabImages) -> list[str]:
    node = nd.node
    binary, machine_options, console = _MACHINES[node_machine(node)]
    identity = (
        f"apull_lab.hostname={node.name} apull_lab.addr={node.lan_addr}/{layout.LAN_MASK_BITS}"
    )
    boot_files = images.boot_files(node.variant)
    if boot_files is None:
        # GRUB on the disk picks the kernel and its command line; the node reads its identity
        # from QEMU's firmware configuration instead (apull-lab-init). The lab's ISO (an OS
        # DVD's layout, the kernel RPM on it) is in its CD-ROM drive, /dev/sr0.
        iso = layout.repo_dir() / ISO_NAME
        boot = ["-fw_cfg", f"name={IDENTITY_FW_CFG},string={identity}",
                "-drive", f"file={iso},media=cdrom,readonly=on"]  # fmt: skip
    else:
        kernel, initrd = boot_files
        append = f"root=/dev/vda rw console={console} net.ifnames=0 quiet {identity}"
        boot = ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    registry_fwd = (
        f"guestfwd=tcp:{layout.GUEST_REGISTRY_ADDR}:{layout.REGISTRY_PORT}"
        f"-cmd:socat - TCP:{layout.host_registry()}"
    )
    repo_fwd = f"guestfwd=tcp:{layout.GUEST_REPO_ADDR}:80-cmd:socat - TCP:{layout.host_repo()}"
    mirror_fwd = (
        f"guestfwd=tcp:{layout.GUEST_MIRROR_ADDR}:{layout.REGISTRY_PORT}"
        f"-cmd:socat - TCP:{layout.HOST_REGISTRY_ADDR}:{layout.HOST_MIRROR_PORT}"
    )
    wan = (
        f"user,id=wan,restrict=on,hostfwd=tcp:127.0.0.1:{node.ssh_port}-:22,"
        f"{registry_fwd},{repo_fwd},{mirror_fwd}"
    )
    return [
        binary,
        "-name", node.name,
        "-accel", "tcg,thread=multi,tb-size=128",
        *machine_options,
        "-m", str(MEMORY_MB),
        "-smp", "1",
        *boot,
        "-drive", f"file={nd.disk},if=virtio,format=qcow2,discard=unmap",
        "-netdev", wan,
        "-device", "virtio-net-pci,netdev=wan",
        "-netdev", f"vde,id=lan,sock={switch_dir()}",
        "-device", f"virtio-net-pci,netdev=lan,mac=52:54:00:0a:00:{node.index:02x}",
        "-display", "none",
        "-serial", f"file:{nd.serial_log}",
        "-qmp", f"unix:{nd.monitor},server=on,wait=off",
        "-pidfile", str(nd.pidfile),
        "-daemonize",
    ]  # fmt: skip


def start_node(
    nd: NodeDir, images: LabImages, fresh: bool, restore: tuple[Path, Path] | None = None
) -> None:
    """Boot a node; with fresh=True its disk overlay is created anew first. With restore, a
    (disk overlay, machine state) pair saved from this node's command line (boot_snapshots.py):
    the overlay is copied in and QEMU resumes the saved machine instead of booting."""
    if not _port_free(nd.node.ssh_port):
        raise LabError(
            f"{nd.node.name}: port 127.0.0.1:{nd.node.ssh_port} is taken by another process"
        )
    nd.path.mkdir(parents=True, exist_ok=True)
    if restore is not None or fresh or not nd.disk.exists():
        nd.disk.unlink(missing_ok=True)
        if restore is not None:
            shutil.copyfile(restore[0], nd.disk)
        else:
            run_logged(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                 "-b", images.disk(nd.node.variant), nd.disk],
                nd.path / "qemu.log", "qemu-img create",
            )  # fmt: skip
        nd.image_link.unlink(missing_ok=True)
        nd.image_link.symlink_to(images.directory)
        nd.variant_file.write_text(nd.node.variant + "\n")
    nd.serial_log.unlink(missing_ok=True)
    nd.monitor.unlink(missing_ok=True)
    command = qemu_command(nd, images)
    if restore is not None:
        command += ["-incoming", f"exec:cat {shlex.quote(str(restore[1]))}"]
    run_logged(command, nd.path / "qemu.log", f"start {nd.node.name}")


def stop_node(nd: NodeDir) -> bool:
    return processes.stop(nd.pidfile)


def ssh_command(node: layout.LabNode, *remote: str, control: str = "") -> list[str]:
    """ssh to a node, sharing one connection per node: a handshake costs seconds under TCG.
    control (-O exit, ...) talks to that shared connection instead of running a command."""
    socket_path = layout.state_dir() / "ssh-%p.sock"
    return [
        "ssh", *SSH_OPTIONS, "-i", str(layout.ssh_key_path()),
        "-o", "ControlMaster=auto", "-o", f"ControlPath={socket_path}", "-o", "ControlPersist=60",
        *(["-O", control] if control else []),
        "-p", str(node.ssh_port), "root@127.0.0.1", *remote,
    ]  # fmt: skip


def close_ssh(node: layout.LabNode) -> None:
    """End the shared connection to the node, if there is one."""
    subprocess.run(ssh_command(node, control="exit"), capture_output=True, timeout=20, check=False)


def ssh(
    node: layout.LabNode, command: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ssh_command(node, command),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for_ssh(nodes: list[NodeDir], timeout: float, tick: float = 3.0) -> dict[str, float]:
    """Wait until every node answers ssh; return the seconds each one took."""
    start = time.monotonic()
    ready: dict[str, float] = {}
    while len(ready) < len(nodes):
        for nd in nodes:
            if nd.node.name in ready:
                continue
            if not nd.running():
                raise LabError(
                    f"{nd.node.name}: qemu exited; see {nd.path / 'qemu.log'} and {nd.serial_log}"
                )
            try:
                if ssh(nd.node, "true", timeout=20).returncode == 0:
                    ready[nd.node.name] = time.monotonic() - start
            except subprocess.TimeoutExpired:
                pass
        if len(ready) < len(nodes):
            if time.monotonic() - start > timeout:
                missing = sorted({nd.node.name for nd in nodes} - set(ready))
                raise LabError(f"no ssh after {timeout:.0f} s from {', '.join(missing)}")
            time.sleep(tick)
    return ready
