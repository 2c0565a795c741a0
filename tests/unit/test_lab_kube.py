"""The lab cluster's parts that need no running cluster: certificates (checked by openssl),
kubeconfigs, the kubelet's files, and where the control plane listens."""

from __future__ import annotations

import base64
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from apull.lab import kube_control, kube_nodes, layout
from apull.lab.kube_pki import Pki, kubeconfig
from apull.lab.run import LabError


@pytest.fixture(autouse=True)
def lab_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path / "state"))
    return tmp_path / "state"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificates_chain_to_the_ca_with_their_names(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    node = pki.ensure("node-node2", "system:node:node2", "system:nodes", client=True)
    server = pki.ensure(
        "apiserver", "kube-apiserver", server=True, dns=("kubernetes",), ips=("10.10.0.1",)
    )
    for pair in (node, server):
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(pki.ca.cert), str(pair.cert)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    subject = _cert(node.cert).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:node2"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    eku = _cert(node.cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    alt = _cert(server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["kubernetes"]
    assert [str(a) for a in alt.get_values_for_type(x509.IPAddress)] == ["10.10.0.1"]


def test_certificates_are_made_once(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    first = pki.ensure("admin", "apull-lab-admin", "system:masters", client=True)
    before = (first.cert.read_bytes(), pki.ca.cert.read_bytes())
    again = pki.ensure("admin", "apull-lab-admin", "system:masters", client=True)
    assert (again.cert.read_bytes(), pki.ca.cert.read_bytes()) == before


def test_kubeconfig_embeds_the_pair(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pair = pki.ensure("admin", "apull-lab-admin", "system:masters", client=True)
    doc = yaml.safe_load(kubeconfig("https://10.10.0.1:6443", pki.ca.cert, pair, "admin"))
    assert doc["clusters"][0]["cluster"]["server"] == "https://10.10.0.1:6443"
    user = doc["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == pair.cert.read_bytes()
    assert base64.b64decode(user["client-key-data"]) == pair.key.read_bytes()
    ca = doc["clusters"][0]["cluster"]["certificate-authority-data"]
    assert base64.b64decode(ca) == pki.ca.cert.read_bytes()


def test_control_plane_listens_only_on_the_lab_network_and_loopback(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    argv = {c.name: c.argv for c in kube_control.components(tmp_path / "bin", pki)}
    assert set(argv) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
    flat = " ".join(" ".join(a) for a in argv.values())
    assert "0.0.0.0" not in flat
    assert f"--bind-address={layout.CONTROL_PLANE_ADDR}" in argv["kube-apiserver"]
    assert "--insecure-port=0" in argv["kube-apiserver"]
    assert "--authorization-mode=Node,RBAC" in argv["kube-apiserver"]
    assert "--listen-client-urls=http://127.0.0.1:2379" in argv["etcd"]
    for name in ("kube-controller-manager", "kube-scheduler"):
        assert "--bind-address=127.0.0.1" in argv[name]


def test_netns_is_per_lab_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = kube_control.netns_name()
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path / "other"))
    assert kube_control.netns_name() != first
    assert first.startswith("apull-lab-")


def test_node_files(tmp_path: Path) -> None:
    members = [layout.LabNode.from_name(f"node{i}", "ondemand") for i in (1, 2, 3)]
    node2 = members[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubelet").write_bytes(b"\x7fELF kubelet")
    files = {f.path: f for f in kube_nodes.node_files(node2, members, Pki(tmp_path / "p"), bin_dir)}
    assert files[kube_nodes.KUBELET].mode == 0o755
    assert files["/etc/kubernetes/pki/kubelet.key"].mode == 0o600
    cni = files[kube_nodes.CNI_CONF].data.decode()
    assert '"subnet": "10.244.2.0/24"' in cni
    routes = files["/etc/kubernetes/pod-routes.sh"].data.decode().splitlines()
    assert routes[2:] == [
        f"ip route replace 10.244.1.0/24 via {members[0].lan_addr}",
        f"ip route replace 10.244.3.0/24 via {members[2].lan_addr}",
    ]
    unit = files["/etc/systemd/system/kubelet.service"].data.decode()
    assert f"--node-ip={node2.lan_addr}" in unit
    assert kube_nodes.CONTAINERD_CONF not in files  # edited in place, not replaced
    assert '"ipMasq": false' in cni  # pods reach each other across nodes without NAT
    kubeconf = yaml.safe_load(files["/etc/kubernetes/kubelet.kubeconfig"].data)
    assert kubeconf["users"][0]["name"] == "system:node:node2"
    assert kubeconf["clusters"][0]["cluster"]["server"] == kube_control.api_url()


DEBIAN_CONTAINERD = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


def test_containerd_config_gets_the_two_keys_and_keeps_the_rest() -> None:
    # Debian's file (its containerd 1.6 package), then the same after apull's patch.
    patched = kube_nodes.containerd_patched(DEBIAN_CONTAINERD)
    doc = tomllib.loads(patched)
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == f"{layout.guest_registry()}/lab/pause:3.2"
    mirror = cri["registry"]["mirrors"][layout.guest_registry()]
    assert mirror["endpoint"] == [f"http://{layout.guest_registry()}"]
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": "/etc/cni/net.d"}
    assert doc["plugins"]["io.containerd.internal.v1.opt"] == {"path": "/var/lib/containerd/opt"}
    assert kube_nodes.containerd_patched(patched) == patched  # a second join changes nothing
    with_apull = patched + (
        '\n[proxy_plugins]\n  [proxy_plugins.apull]\n    type = "snapshot"\n'
        '    address = "/run/containerd-apull-grpc.sock"\n'
    )
    assert kube_nodes.containerd_patched(with_apull) == with_apull


def test_containerd_config_keeps_other_mirror_endpoints() -> None:
    reg = layout.guest_registry()
    text = (
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{reg}"]\n'
        'endpoint = ["https://mirror.example"]\n'
    )
    doc = tomllib.loads(kube_nodes.containerd_patched(text))
    mirror = doc["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["mirrors"][reg]
    assert mirror["endpoint"] == [f"http://{reg}", "https://mirror.example"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("version = 3\n", "version = 3"),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
            'config_path = "/etc/containerd/certs.d"\n',
            "registry.config_path is set",
        ),
    ],
)
def test_containerd_config_it_cannot_edit_is_refused(text: str, says: str) -> None:
    with pytest.raises(LabError, match=says):
        kube_nodes.containerd_patched(text)
