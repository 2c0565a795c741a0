"""The kernel role upgraded the stock node through the package manager and one reboot."""

testinfra_hosts = ["ansible://molecule_nodes"]


def test_the_package_came_from_the_lab_repository(host):
    release = host.sysctl("kernel.osrelease")
    pkg = host.package(f"apull-ondemand-modules-{release}")
    assert pkg.is_installed
    policy = host.run(f"apt-cache policy apull-ondemand-modules-{release}").stdout
    assert "http://repo.lab ./" in policy
    assert host.file("/etc/apt/sources.list.d/apull-kernel.list").contains("repo.lab")


def test_the_node_rebooted_into_the_new_modules(host):
    before = host.file("/var/tmp/boot-id-before").content_string.strip()
    assert before and before != host.file("/proc/sys/kernel/random/boot_id").content_string.strip()
    # The record survived the reboot, so it was one reboot of this disk, not a fresh node.
    assert host.file("/var/tmp/boot-id-before").exists


def test_on_demand_modules_are_the_rebuilt_ones(host):
    assert "/updates/" in host.run("modinfo -F filename cachefiles").stdout
    assert "/updates/" in host.run("modinfo -F filename erofs").stdout
    assert host.file("/sys/module/fs_ctl/parameters/erofs_enabled").exists


def test_bind_ondemand_is_accepted(host):
    probe = host.run(
        "modprobe cachefiles && python3 -c \"import os,tempfile;"
        "fd=os.open('/dev/cachefiles',os.O_RDWR);"
        "os.write(fd,('dir '+tempfile.mkdtemp(dir='/var/tmp')).encode());"
        "os.write(fd,b'bind ondemand');print('accepted')\""
    )
    assert probe.stdout.strip() == "accepted", probe.stderr
