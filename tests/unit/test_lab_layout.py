"""How the lab starts its nodes and tracks its processes (no VM is booted here)."""

from __future__ import annotations

import subprocess
import sys

from apull.lab import image, layout, nodes, processes
from apull.lab.image import LabImages


def test_node_addresses_are_fixed_by_index():
    node = layout.LabNode(2, "stock")
    # 2222 unless APULL_LAB_SSH_PORT_BASE moves the lab (two labs on one host).
    port = layout.SSH_PORT_BASE + 2
    assert (node.name, node.ssh_port, node.lan_addr) == ("node2", port, "10.10.0.12")


def test_qemu_command_forwards_only_ssh_registry_and_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path))
    images = LabImages(tmp_path / "img", tmp_path / "img/vmlinuz", tmp_path / "img/initrd", "6.1")
    cmd = nodes.qemu_command(nodes.NodeDir(layout.LabNode(3, "ondemand")), images)
    wan = cmd[cmd.index("-netdev") + 1]
    assert "restrict=on" in wan
    assert f"hostfwd=tcp:127.0.0.1:{layout.SSH_PORT_BASE + 3}-:22" in wan
    assert f"guestfwd=tcp:{layout.GUEST_REGISTRY_ADDR}:{layout.REGISTRY_PORT}-cmd:" in wan
    mirror = f"127.0.0.1:{layout.HOST_MIRROR_PORT}"
    assert f"guestfwd=tcp:{layout.GUEST_MIRROR_ADDR}:5000-cmd:socat - TCP:{mirror}" in wan
    assert layout.HOST_MIRROR_PORT == layout.HOST_REGISTRY_PORT + 1
    append = cmd[cmd.index("-append") + 1]
    assert "apull_lab.hostname=node3" in append
    assert "apull_lab.addr=10.10.0.13/24" in append
    assert "tcg" in cmd[cmd.index("-accel") + 1]
    assert "kvm" not in " ".join(cmd)
    assert f"file={tmp_path / 'nodes/node3/disk.qcow2'}" in " ".join(cmd)


def test_an_arm64_node_boots_its_own_kernel_on_the_aarch64_virt_board(tmp_path, monkeypatch):
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path))
    images = LabImages(tmp_path / "img", tmp_path / "img/vmlinuz", tmp_path / "img/initrd", "6.1")
    arm = nodes.qemu_command(nodes.NodeDir(layout.LabNode(2, "arm64")), images)
    x86 = nodes.qemu_command(nodes.NodeDir(layout.LabNode(1, "bullseye")), images)
    assert (arm[0], x86[0]) == ("qemu-system-aarch64", "qemu-system-x86_64")
    assert arm[arm.index("-machine") + 1] == "virt" and "-machine" not in x86
    assert arm[arm.index("-kernel") + 1] == str(tmp_path / "img/vmlinuz-arm64")
    assert arm[arm.index("-initrd") + 1] == str(tmp_path / "img/initrd-arm64.img")
    assert x86[x86.index("-kernel") + 1] == str(tmp_path / "img/vmlinuz")
    assert "console=ttyAMA0" in arm[arm.index("-append") + 1]
    assert "console=ttyS0" in x86[x86.index("-append") + 1]
    assert nodes.node_machine(layout.LabNode(2, "arm64")) == "aarch64"
    assert "tcg" in arm[arm.index("-accel") + 1] and "kvm" not in " ".join(arm)


def test_a_kernel510_node_boots_grub_from_its_disk_with_the_iso_in_its_drive(tmp_path, monkeypatch):
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("APULL_LAB_CACHE", str(tmp_path / "cache"))
    images = LabImages(tmp_path / "img", tmp_path / "img/vmlinuz", tmp_path / "img/initrd", "6.1")
    cmd = nodes.qemu_command(nodes.NodeDir(layout.LabNode(4, "kernel510")), images)
    # No -kernel: what boots is GRUB's choice, so a kernel upgrade really changes it.
    assert "-kernel" not in cmd and "-initrd" not in cmd and "-append" not in cmd
    fw_cfg = cmd[cmd.index("-fw_cfg") + 1]
    assert fw_cfg == (
        "name=opt/apull_lab/cmdline,string=apull_lab.hostname=node4 apull_lab.addr=10.10.0.14/24"
    )
    drives = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-drive"]
    iso = tmp_path / "cache/package-repo/apull-lab.iso"
    disk = f"file={tmp_path / 'state/nodes/node4/disk.qcow2'},if=virtio,format=qcow2,discard=unmap"
    assert sorted(drives) == sorted([f"file={iso},media=cdrom,readonly=on", disk])


def test_the_boot_disk_gets_an_mbr_with_one_bootable_linux_partition():
    table = image._partition_table(2048, 12_580_864)
    assert len(table) == 512 - 440
    entry = table[6:22]
    assert entry[0] == 0x80 and entry[4] == 0x83
    assert int.from_bytes(entry[8:12], "little") == 2048
    assert int.from_bytes(entry[12:16], "little") == 12_580_864
    assert table[22:70] == bytes(48) and table[-2:] == b"\x55\xaa"


def test_processes_stop_a_running_process_and_clear_its_pidfile(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pidfile = tmp_path / "p.pid"
    pidfile.write_text(f"{proc.pid}\n")
    assert processes.is_alive(pidfile)
    assert processes.stop(pidfile, timeout=5) is True
    proc.wait(5)
    assert not pidfile.exists()
    assert processes.stop(pidfile) is False


def test_processes_treat_a_stale_pidfile_as_dead(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()
    pidfile = tmp_path / "stale.pid"
    pidfile.write_text(f"{proc.pid}\n")
    assert not processes.is_alive(pidfile)
    (tmp_path / "junk.pid").write_text("not a pid")
    assert not processes.is_alive(tmp_path / "junk.pid")
