"""The containerd role patched Debian's config.toml in place, kept the original, and
containerd runs on the new config."""

import json
import tomllib

testinfra_hosts = ["ansible://molecule_nodes"]

CONF = "/etc/containerd/config.toml"
BACKUP = CONF + ".apull-orig"
CRI = ("plugins", "io.containerd.grpc.v1.cri", "containerd")
# What inventory/group_vars set for the lab: config.txt's insecure registry, and apull as CRI's
# snapshotter.
LAB_REGISTRY = "registry.lab:5000"
CERTS = "/etc/containerd/certs.d"


def debian_md5(host):
    conffiles = host.run("dpkg-query -W -f='${Conffiles}\\n' containerd").stdout
    return {line.split()[0]: line.split()[1] for line in conffiles.splitlines() if line.strip()}[
        CONF
    ]


def config(host):
    return tomllib.loads(host.file(CONF).content_string)


def test_proxy_plugin_and_cri_settings_are_in_the_file(host):
    data = config(host)
    assert data["version"] == 2
    assert data["proxy_plugins"]["apull"] == {
        "type": "snapshot",
        "address": "/run/containerd-apull-grpc.sock",
    }
    cri = data
    for part in CRI:
        cri = cri[part]
    assert cri["disable_snapshot_annotations"] is False
    assert cri["discard_unpacked_layers"] is False
    assert cri["snapshotter"] == "apull"
    registry = data["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
    assert registry == {"config_path": CERTS}


def test_the_lab_registry_is_plain_http_in_its_hosts_toml(host):
    hosts = host.file(f"{CERTS}/{LAB_REGISTRY}/hosts.toml")
    assert (hosts.user, hosts.group, hosts.mode) == ("root", "root", 0o644)
    text = hosts.content_string
    assert text.startswith("# Written by apull-deploy (roles/containerd)")
    assert tomllib.loads(text) == {
        "server": f"http://{LAB_REGISTRY}",
        "host": {f"http://{LAB_REGISTRY}": {"capabilities": ["pull", "resolve", "push"]}},
    }
    assert host.run(f"ls -A {CERTS}").stdout.split() == [LAB_REGISTRY]


def test_debian_settings_are_kept(host):
    data = config(host)
    assert data["plugins"]["io.containerd.grpc.v1.cri"]["cni"] == {
        "bin_dir": "/usr/lib/cni",
        "conf_dir": "/etc/cni/net.d",
    }
    assert data["plugins"]["io.containerd.internal.v1.opt"] == {"path": "/var/lib/containerd/opt"}


def test_backup_is_debians_file(host):
    backup = host.file(BACKUP)
    assert backup.is_file
    assert backup.md5sum == debian_md5(host)
    conf = host.file(CONF)
    assert (backup.user, backup.group, backup.mode) == (conf.user, conf.group, conf.mode)
    assert not host.file(BACKUP + ".absent").exists


def test_written_in_place(host):
    inode, mtime = host.file("/tmp/apull-containerd-inode").content_string.split()
    assert host.run(f"stat -c %i {CONF}").stdout.strip() == inode
    # The backup keeps the original's times.
    assert host.run(f"stat -c %Y {BACKUP}").stdout.strip() == mtime
    conf = host.file(CONF)
    assert (conf.user, conf.group, conf.mode) == ("root", "root", 0o644)


def test_no_leftovers(host):
    assert not host.file(CONF + ".apull-prev").exists
    assert host.run("ls -A /etc/containerd").stdout.split() == [
        "certs.d",
        "config.toml",
        "config.toml.apull-hosts",
        "config.toml.apull-orig",
        "config.toml.apull-patch.json",
    ]
    listed = host.file(CONF + ".apull-hosts").content_string.splitlines()
    assert listed == [f"{CERTS}/{LAB_REGISTRY}/hosts.toml", f"@created {CERTS}"]


def test_the_patch_is_recorded_for_apull_status(host):
    record = json.loads(host.file(CONF + ".apull-patch.json").content_string)
    assert record["sha256"] == host.file(CONF).sha256sum
    assert record["proxy_address"] == "/run/containerd-apull-grpc.sock"
    assert record["set_default_snapshotter"] is True
    assert record["insecure_registries"] == [LAB_REGISTRY]
    assert record["registry_mirrors"] == [] and record["registry_hosts_dir"] == CERTS


def test_containerd_runs_on_the_new_config(host):
    assert host.service("containerd").is_running
    assert host.run("ctr --connect-timeout 5s version").rc == 0
    dump = tomllib.loads(host.check_output("containerd config dump 2>/dev/null"))
    assert dump["proxy_plugins"]["apull"]["address"] == "/run/containerd-apull-grpc.sock"
    cri = dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["disable_snapshot_annotations"] is False
    assert cri["snapshotter"] == "apull"
    registry = dump["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
    assert registry["config_path"] == CERTS and not registry.get("mirrors")


def test_containerd_loaded_the_proxy_plugin(host):
    # Listed whatever its status: the snapshotter itself is the apull role's business.
    plugins = host.check_output("ctr --connect-timeout 5s plugins ls")
    assert any(
        line.split()[:2] == ["io.containerd.snapshotter.v1", "apull"]
        for line in plugins.splitlines()
    ), plugins
