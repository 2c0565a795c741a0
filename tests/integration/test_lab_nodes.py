"""The lab's nodes are real machines: ssh, systemd, containerd, the lab registry, the LAN."""

from __future__ import annotations

import pytest
from conftest import run_on

from apull.lab import layout, test_image


def test_each_node_answers_ssh_with_its_own_name(lab):
    for node in lab:
        res = run_on(node, "hostname; cat /etc/os-release")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[0] == node.name
        assert "VERSION_CODENAME=bookworm" in res.stdout


def test_systemd_is_pid1_and_containerd_is_active(hosts):
    for host in hosts.values():
        assert host.file("/proc/1/comm").content_string.strip() == "systemd"
        assert host.service("containerd").is_running
        assert host.service("containerd").is_enabled
        assert host.package("runc").is_installed
        assert host.run("containerd --version").stdout.split()[2].startswith("1.6.")


def test_nodes_reach_each_other_on_the_lab_network(lab):
    first, *others = lab
    for other in others:
        res = run_on(first, f"ping -c1 -W5 {other.name}")
        assert res.returncode == 0, f"{first.name} cannot reach {other.name}: {res.stdout}"
        assert other.lan_addr in res.stdout


def test_every_node_pulls_the_lab_test_image(lab):
    ref = f"{layout.guest_registry()}/{test_image.REPO}:{test_image.TAG}"
    for node in lab:
        run_on(node, f"ctr images rm {ref} >/dev/null 2>&1")
        res = run_on(node, f"ctr images pull --plain-http {ref}")
        assert res.returncode == 0, f"{node.name}: {res.stderr}"
        listed = run_on(node, "ctr images ls -q")
        assert ref in listed.stdout.split()


def test_nodes_see_nothing_but_the_lab(lab):
    """restrict=on: the user-mode NIC reaches only what the lab forwards (the registry), not
    the host behind the gateway, where the same registry listens on loopback."""
    probe = "timeout 10 bash -c 'echo > /dev/tcp/{}/{}' && echo open || echo closed"
    forwarded = run_on(lab[0], probe.format(layout.GUEST_REGISTRY_ADDR, layout.REGISTRY_PORT))
    assert forwarded.stdout.strip() == "open"
    gateway = run_on(lab[0], probe.format("10.0.2.2", layout.HOST_REGISTRY_PORT))
    assert gateway.stdout.strip() == "closed"


@pytest.mark.parametrize("param", ["erofs_enabled", "cachefiles_ondemand_enabled"])
def test_fs_ctl_gate_is_on_only_once(ondemand_nodes, param):
    node = ondemand_nodes[0]
    path = f"/sys/module/fs_ctl/parameters/{param}"
    # A fresh module is what a fresh boot gives (the gate is not persistent).
    reload = run_on(node, "modprobe -r fs_ctl && modprobe fs_ctl")
    assert reload.returncode == 0, reload.stderr
    assert run_on(node, f"cat {path}").stdout.strip() == "N"
    assert run_on(node, f"echo 1 > {path}").returncode == 0
    assert run_on(node, f"cat {path}").stdout.strip() == "Y"
    turn_off = run_on(node, f"echo 0 > {path}")
    assert turn_off.returncode != 0
    assert "busy" in turn_off.stderr.lower()
    assert run_on(node, f"cat {path}").stdout.strip() == "Y"
    # Leave the gate as a boot leaves it.
    assert run_on(node, "modprobe -r fs_ctl && modprobe fs_ctl").returncode == 0


def test_fs_ctl_is_loaded_at_boot_like_a_builtin(ondemand_nodes, stock_nodes):
    assert run_on(ondemand_nodes[0], "test -d /sys/module/fs_ctl").returncode == 0
    assert run_on(stock_nodes[0], "test -d /sys/module/fs_ctl").returncode != 0


BIND_PROBE = r"""
modprobe cachefiles && python3 - <<'PY'
import errno, os, shutil, tempfile
fd = os.open("/dev/cachefiles", os.O_RDWR)
cache = tempfile.mkdtemp(dir="/var/tmp", prefix="probe-")
os.write(fd, ("dir " + cache).encode())
try:
    os.write(fd, b"bind ondemand")
    print("accepted")
except OSError as exc:
    print("rejected", errno.errorcode[exc.errno])
os.close(fd)
shutil.rmtree(cache)
PY
"""


def test_bind_ondemand_accepted_with_lab_modules(ondemand_nodes):
    for node in ondemand_nodes:
        res = run_on(node, BIND_PROBE)
        assert res.stdout.strip() == "accepted", f"{node.name}: {res.stdout} {res.stderr}"
        modpath = run_on(node, "modinfo -F filename cachefiles").stdout.strip()
        assert "/updates/" in modpath


def test_bind_ondemand_rejected_on_stock_node(stock_nodes):
    for node in stock_nodes:
        res = run_on(node, BIND_PROBE)
        assert res.stdout.strip().startswith("rejected"), f"{node.name}: {res.stdout}"
        assert "EINVAL" in res.stdout or "EOPNOTSUPP" in res.stdout
