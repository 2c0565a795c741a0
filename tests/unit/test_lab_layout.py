"""How the lab starts its nodes and tracks its processes (no VM is booted here)."""

from __future__ import annotations

import subprocess
import sys

from apull.lab import layout, nodes, processes
from apull.lab.image import LabImages


def test_node_addresses_are_fixed_by_index():
    node = layout.LabNode(2, "stock")
    # 2222 unless APULL_LAB_SSH_PORT_BASE moves the lab (two labs on one host).
    port = layout.SSH_PORT_BASE + 2
    assert (node.name, node.ssh_port, node.lan_addr) == ("node2", port, "10.10.0.12")


def test_qemu_command_isolates_the_node_and_forwards_only_ssh_and_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path))
    images = LabImages(tmp_path / "img", tmp_path / "img/vmlinuz", tmp_path / "img/initrd", "6.1")
    cmd = nodes.qemu_command(nodes.NodeDir(layout.LabNode(3, "ondemand")), images)
    wan = cmd[cmd.index("-netdev") + 1]
    assert "restrict=on" in wan
    assert f"hostfwd=tcp:127.0.0.1:{layout.SSH_PORT_BASE + 3}-:22" in wan
    assert f"guestfwd=tcp:{layout.GUEST_REGISTRY_ADDR}:{layout.REGISTRY_PORT}-cmd:" in wan
    append = cmd[cmd.index("-append") + 1]
    assert "apull_lab.hostname=node3" in append
    assert "apull_lab.addr=10.10.0.13/24" in append
    assert "tcg" in cmd[cmd.index("-accel") + 1]
    assert "kvm" not in " ".join(cmd)
    assert f"file={tmp_path / 'nodes/node3/disk.qcow2'}" in " ".join(cmd)


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
