"""The fscache role left the node with modules loaded, the gate open, and both kept at boot."""

import pytest

testinfra_hosts = ["ansible://molecule_nodes"]


def test_modules_are_loaded_and_listed_for_boot(host):
    modules = host.file("/etc/modules-load.d/apull.conf")
    assert modules.exists
    assert modules.mode == 0o644
    listed = [ln for ln in modules.content_string.splitlines() if ln and not ln.startswith("#")]
    assert listed == ["cachefiles", "erofs"]
    for name in listed:
        assert host.file(f"/sys/module/{name}").is_directory


@pytest.mark.parametrize("param", ["erofs_enabled", "cachefiles_ondemand_enabled"])
def test_fs_ctl_gate_is_open(host, param):
    assert host.file(f"/sys/module/fs_ctl/parameters/{param}").content_string.strip() == "Y"


def test_gate_unit_is_enabled_and_runs_before_containerd(host):
    unit = host.service("apull-fs-ctl.service")
    assert unit.is_enabled
    order = host.run("systemctl show -p Before -p After apull-fs-ctl.service").stdout
    assert "containerd.service" in order.split("Before=")[1].splitlines()[0]
    assert "systemd-modules-load.service" in order


def test_bind_ondemand_is_accepted_now(host):
    probe = host.run(
        "python3 -c \"import os,tempfile;fd=os.open('/dev/cachefiles',os.O_RDWR);"
        "os.write(fd,('dir '+tempfile.mkdtemp(dir='/var/tmp')).encode());"
        "os.write(fd,b'bind ondemand');print('accepted')\""
    )
    assert probe.stdout.strip() == "accepted", probe.stderr
