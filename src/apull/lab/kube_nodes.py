"""Joining the lab's nodes to its cluster: a kubelet on every node, with its own credentials,
on the node's own containerd (CRI), with pod addresses from CNI.

What a node gets (all of it a cluster administrator's set-up, none of it apull's):
- /usr/local/bin/kubelet and a systemd unit for it (kubelet.service, enabled);
- /etc/kubernetes: the CA, the node's client certificate (`system:node:NAME` in
  `system:nodes`) in its kubeconfig, its serving certificate, and the kubelet's config;
- /etc/cni/net.d/10-lab.conflist: a bridge with host-local addresses from the node's own pod
  range (POD_PREFIX.INDEX.0/24), with routes to the other nodes' ranges over the lab network
  (set again at every kubelet start);
- /etc/containerd/config.toml: Debian's file plus the sandbox (pause) image from the lab's
  registry, which containerd reaches over plain HTTP. containerd restarts only if it changed.

A node whose files all match is left alone; the kubelet binary (58 MB) is copied only when
it differs.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from apull.lab import kube_control, layout, nodes
from apull.lab.kube_pki import Pki, kubeconfig
from apull.lab.run import LabError

POD_PREFIX = "10.244"
PAUSE_REPO = "lab/pause"
PAUSE_TAG = "3.2"
KUBELET = "/usr/local/bin/kubelet"
CNI_CONF = "/etc/cni/net.d/10-lab.conflist"
CONTAINERD_CONF = "/etc/containerd/config.toml"
CONTAINERD_SOCKET = "unix:///run/containerd/containerd.sock"


def pause_image() -> str:
    return f"{layout.guest_registry()}/{PAUSE_REPO}:{PAUSE_TAG}"


def pod_cidr(node: layout.LabNode) -> str:
    return f"{POD_PREFIX}.{node.index}.0/24"


def containerd_config() -> str:
    """Debian's containerd config.toml, with the lab's sandbox image and plain-HTTP registry."""
    reg = layout.guest_registry()
    return f"""version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{pause_image()}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{reg}"]
      endpoint = ["http://{reg}"]
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


def cni_config(node: layout.LabNode) -> str:
    conf = {
        "cniVersion": "0.4.0",
        "name": "lab",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr(node)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(conf, indent=2) + "\n"


def pod_routes(node: layout.LabNode, members: list[layout.LabNode]) -> str:
    lines = ["#!/bin/sh", "# Routes to the other lab nodes' pod ranges (written by apull lab)."]
    for other in members:
        if other.name != node.name:
            lines.append(f"ip route replace {pod_cidr(other)} via {other.lan_addr}")
    return "\n".join(lines) + "\n"


def kubelet_config() -> str:
    return """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: /etc/kubernetes/pki/ca.crt
authorization:
  mode: Webhook
cgroupDriver: cgroupfs
clusterDomain: cluster.local
failSwapOn: false
tlsCertFile: /etc/kubernetes/pki/kubelet.crt
tlsPrivateKeyFile: /etc/kubernetes/pki/kubelet.key
# Lab nodes are small: evict only when really short.
evictionHard:
  memory.available: 32Mi
  nodefs.available: 3%
  imagefs.available: 3%
"""


def kubelet_unit(node: layout.LabNode) -> str:
    args = [
        KUBELET, "--config=/etc/kubernetes/kubelet.yaml",
        "--kubeconfig=/etc/kubernetes/kubelet.kubeconfig",
        "--container-runtime=remote", f"--container-runtime-endpoint={CONTAINERD_SOCKET}",
        f"--node-ip={node.lan_addr}", f"--pod-infra-container-image={pause_image()}", "--v=1",
    ]  # fmt: skip
    return f"""[Unit]
Description=kubelet of the apull lab cluster
After=containerd.service network-online.target
Wants=containerd.service

[Service]
ExecStartPre=/bin/sh /etc/kubernetes/pod-routes.sh
ExecStart={" ".join(args)}
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class NodeFile:
    path: str
    data: bytes
    mode: int = 0o644


def node_files(
    node: layout.LabNode, members: list[layout.LabNode], pki: Pki, bin_dir: Path
) -> list[NodeFile]:
    client = pki.ensure(
        f"node-{node.name}", f"system:node:{node.name}", "system:nodes", client=True
    )
    serving = pki.ensure(
        f"kubelet-{node.name}", node.name, server=True, dns=(node.name,), ips=(node.lan_addr,)
    )
    kubeconf = kubeconfig(kube_control.api_url(), pki.ca.cert, client, f"system:node:{node.name}")
    return [
        NodeFile(KUBELET, (bin_dir / "kubelet").read_bytes(), 0o755),
        NodeFile("/etc/kubernetes/pki/ca.crt", pki.ca.cert.read_bytes()),
        NodeFile("/etc/kubernetes/pki/kubelet.crt", serving.cert.read_bytes()),
        NodeFile("/etc/kubernetes/pki/kubelet.key", serving.key.read_bytes(), 0o600),
        NodeFile("/etc/kubernetes/kubelet.kubeconfig", kubeconf.encode(), 0o600),
        NodeFile("/etc/kubernetes/kubelet.yaml", kubelet_config().encode()),
        NodeFile("/etc/kubernetes/pod-routes.sh", pod_routes(node, members).encode(), 0o755),
        NodeFile("/etc/systemd/system/kubelet.service", kubelet_unit(node).encode()),
        NodeFile(CNI_CONF, cni_config(node).encode()),
        NodeFile(CONTAINERD_CONF, containerd_config().encode()),
    ]


def _tar(files: list[NodeFile]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in files:
            info = tarfile.TarInfo(f.path.lstrip("/"))
            info.size = len(f.data)
            info.mode = f.mode
            tar.addfile(info, io.BytesIO(f.data))
    return buf.getvalue()


@dataclass(frozen=True)
class JoinResult:
    node: str
    changed: tuple[str, ...]


def join(
    node: layout.LabNode, members: list[layout.LabNode], pki: Pki, bin_dir: Path
) -> JoinResult:
    """Put the kubelet's files on the node (only those that differ) and (re)start what they
    concern. Raises LabError naming the node when a step fails."""
    files = node_files(node, members, pki, bin_dir)
    paths = " ".join(shlex.quote(f.path) for f in files)
    res = nodes.ssh(node, f"sha256sum {paths} 2>/dev/null; true", timeout=120)
    have = {}
    for line in res.stdout.splitlines():
        digest, _, path = line.partition("  ")
        have[path] = digest
    changed = [f for f in files if have.get(f.path) != hashlib.sha256(f.data).hexdigest()]
    names = tuple(f.path for f in changed)
    if changed:
        # Extract beside, then rename: a half-copied kubelet or config is never in place.
        script = (
            'set -e; d=$(mktemp -d /var/tmp/apull-kube.XXXXXX); tar -x -C "$d"; '
            'cd "$d"; find . -type f | while read -r f; do '
            't="/${f#./}"; mkdir -p "$(dirname "$t")"; mv -f "$f" "$t"; done; '
            'rm -rf "$d"'
        )
        proc = subprocess.run(
            nodes.ssh_command(node, script), input=_tar(changed), capture_output=True,
            timeout=600, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise LabError(f"{node.name}: copying the kubelet's files failed: "
                           f"{proc.stderr.decode(errors='replace').strip()}")  # fmt: skip
    steps = ["systemctl daemon-reload"] if any(n.endswith(".service") for n in names) else []
    if CONTAINERD_CONF in names:
        steps.append("systemctl restart containerd")
    if changed:
        steps.append("systemctl enable kubelet && systemctl restart kubelet")
    else:
        steps.append("systemctl enable kubelet && systemctl start kubelet")
    res = nodes.ssh(node, " && ".join(steps), timeout=180)
    if res.returncode != 0:
        raise LabError(f"{node.name}: starting the kubelet failed: {res.stderr.strip()}")
    return JoinResult(node.name, names)
