"""After the failed, rolled-back run the node is exactly as before: Debian's config.toml, the
same inode, no backup or leftovers, containerd running on it."""

testinfra_hosts = ["ansible://molecule_nodes"]

CONF = "/etc/containerd/config.toml"


def test_config_is_byte_for_byte_as_before(host):
    before = host.file("/tmp/apull-containerd-sha256").content_string.split()[0]
    assert host.file(CONF).sha256sum == before


def test_config_is_debians_file(host):
    conffiles = host.run("dpkg-query -W -f='${Conffiles}\\n' containerd").stdout
    md5 = {ln.split()[0]: ln.split()[1] for ln in conffiles.splitlines() if ln.strip()}[CONF]
    assert host.file(CONF).md5sum == md5


def test_same_inode_and_times(host):
    before = host.file("/tmp/apull-containerd-inode").content_string.split()
    assert host.run(f"stat -c '%i %Y' {CONF}").stdout.split() == before


def test_nothing_left_behind(host):
    # The backup written by the failed run is removed with it: the node is as before the run.
    assert host.run("ls -A /etc/containerd").stdout.split() == ["config.toml"]


def test_containerd_runs(host):
    assert host.service("containerd").is_running
    assert host.run("ctr --connect-timeout 5s version").rc == 0
    assert host.run("systemctl is-failed containerd").stdout.strip() == "active"
