"""The apull role left both services running, installed as documented, answering."""

import json
from pathlib import Path

import pytest

testinfra_hosts = ["ansible://molecule_nodes"]

MANIFEST = Path(__file__).resolve().parents[5] / "build" / "bundle" / "manifest.json"


ARTEFACTS = json.loads(MANIFEST.read_text())["binaries"]


def node_platform(host):
    """The bundle's platform directory for this node: x86_64-cp311."""
    arch = host.check_output("uname -m")
    python = host.check_output("readlink -f /usr/bin/python3").rsplit("python", 1)[1]
    return f"{arch}-cp{python.replace('.', '')}"


@pytest.mark.parametrize("name", sorted({b["name"] for b in ARTEFACTS}))
def test_binaries_are_the_bundles_for_the_nodes_platform(host, name):
    key = node_platform(host)
    (binary,) = [b for b in ARTEFACTS if b["name"] == name and b["platform"] in ("any", key)]
    f = host.file(binary["install_path"])
    assert f.exists and f.user == "root" and f.mode == 0o550
    assert f.sha256sum == binary["sha256"]


@pytest.mark.parametrize(
    "path,mode",
    [
        ("/var/lib/containerd-apull", 0o700),
        ("/var/lib/containerd-apull/cachefiles", 0o700),
        ("/var/lib/apull", 0o700),
        ("/etc/apull/config.toml", 0o640),
        ("/etc/systemd/system/apulld.service", 0o640),
        ("/etc/systemd/system/apull-snapshotter.service", 0o640),
    ],
)
def test_files_and_modes(host, path, mode):
    assert host.file(path).exists
    assert host.file(path).mode == mode


@pytest.mark.parametrize("unit", ["apulld.service", "apull-snapshotter.service"])
def test_services_run_and_are_kept_over_restarts(host, unit):
    service = host.service(unit)
    assert service.is_running and service.is_enabled
    props = host.run(f"systemctl show -p KillMode -p Restart -p Before -p Type {unit}").stdout
    assert "KillMode=process" in props
    assert "Restart=always" in props
    assert "Type=notify" in props
    assert "containerd.service" in props.split("Before=")[1].splitlines()[0]


@pytest.mark.parametrize("sock", ["/run/apulld.sock", "/run/containerd-apull-grpc.sock"])
def test_sockets_are_private(host, sock):
    f = host.file(sock)
    assert f.is_socket and f.mode == 0o600


def test_apulld_answers_and_holds_the_device_on_an_ondemand_node(host):
    ping = host.run(
        "python3 -c \"import http.client,socket,json\n"
        "c=http.client.HTTPConnection('x')\n"
        "s=socket.socket(socket.AF_UNIX);s.connect('/run/apulld.sock');c.sock=s\n"
        "c.request('PUT','/v1.0/apulld/ping');print(c.getresponse().read().decode())\""
    )
    assert ping.rc == 0, ping.stderr
    answer = json.loads(ping.stdout)
    assert answer["status"] == "ok"
    assert answer["backend"] == "fscache"
    pid = host.run("systemctl show -p MainPID --value apulld.service").stdout.strip()
    fds = host.run(f"ls -l /proc/{pid}/fd").stdout
    assert "/dev/cachefiles" in fds


def test_containerd_sees_the_snapshotter(host):
    plugins = host.run("ctr plugins ls").stdout
    assert any(
        line.split()[:2] == ["io.containerd.snapshotter.v1", "apull"] and line.split()[-1] == "ok"
        for line in plugins.splitlines()
    ), plugins
    assert host.run("ctr snapshots --snapshotter apull ls").rc == 0
