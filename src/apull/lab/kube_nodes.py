"""Joining the lab's nodes to its cluster: a kubelet on every node, with its own credentials,
on the node's own containerd (CRI), with pod addresses from CNI.

What a node gets (all of it a cluster administrator's set-up, none of it apull's):
- /usr/local/bin/kubelet and a systemd unit for it (kubelet.service, enabled);
- /etc/kubernetes: the CA, the node's client certificate (`system:node:NAME` in
  `system:nodes`) in its kubeconfig, its serving certificate, and the kubelet's config;
- /etc/cni/net.d/10-lab.conflist: a bridge with host-local addresses from the node's own pod
  range (POD_PREFIX.INDEX.0/24), with routes to the other nodes' ranges over the lab network
  (set again at every kubelet start);
- /etc/containerd/config.toml: the node's own file with two keys made sure of (tomlkit keeps
  the rest, apull's proxy plugin included): the sandbox (pause) image from the lab's
  registry, and a plain-HTTP mirror for that registry. containerd restarts only if it changed.

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

import tomlkit

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


def containerd_patched(text: str) -> str:
    """The node's containerd config.toml with the lab's sandbox image and a plain-HTTP mirror
    for the lab registry; everything else (apull's proxy plugin among it) kept as it is, so
    the text comes back unchanged when both are already there."""
    doc = tomlkit.parse(text) if text.strip() else tomlkit.document()
    version = doc.get("version", 1)
    if version != 2:
        raise LabError(
            f"{CONTAINERD_CONF}: version = {version}; the lab's kubelet set-up edits version 2 "
            "files (Debian's containerd 1.6)"
        )
    plugins = doc.setdefault("plugins", tomlkit.table())
    cri = plugins.setdefault("io.containerd.grpc.v1.cri", tomlkit.table())
    if cri.get("sandbox_image") != pause_image():
        cri["sandbox_image"] = pause_image()
    registry = cri.setdefault("registry", tomlkit.table())
    if registry.get("config_path"):
        raise LabError(
            f"{CONTAINERD_CONF}: registry.config_path is set (hosts.toml); the lab's set-up "
            "writes a CRI mirror, which containerd refuses beside it"
        )
    mirrors = registry.setdefault("mirrors", tomlkit.table())
    reg = layout.guest_registry()
    mirror = mirrors.setdefault(reg, tomlkit.table())
    endpoints = list(mirror.get("endpoint", []))
    if f"http://{reg}" not in endpoints:
        mirror["endpoint"] = [f"http://{reg}", *endpoints]
    return tomlkit.dumps(doc)


def cni_config(node: layout.LabNode) -> str:
    conf = {
        "cniVersion": "0.4.0",
        "name": "lab",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                # Pods reach each other across nodes by their own addresses (routes over
                # the lab network), never through NAT.
                "ipMasq": False,
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


def _ssh(node: layout.LabNode, command: str, timeout: float) -> str:
    try:
        res = nodes.ssh(node, command, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{node.name}: no answer within {timeout:.0f} s to: {command}") from exc
    if res.returncode != 0:
        raise LabError(f"{node.name}: `{command}` failed: {res.stderr.strip()}")
    return res.stdout


#: Extract into a directory beside, then rename each file into place: a half-copied kubelet
#: or config is never in place, and the directory (it holds the node's key) goes on any exit.
_INSTALL = (
    "set -e; d=$(mktemp -d /var/tmp/apull-kube.XXXXXX); trap 'rm -rf \"$d\"' EXIT; "
    'tar -x -C "$d"; cd "$d"; find . -type f | while read -r f; do '
    't="/${f#./}"; mkdir -p "$(dirname "$t")"; mv -f "$f" "$t" || { echo "$t" >&2; exit 1; }; '
    "done"
)


def join(
    node: layout.LabNode, members: list[layout.LabNode], pki: Pki, bin_dir: Path
) -> JoinResult:
    """Put the kubelet's files on the node (only those that differ) and (re)start what they
    concern. Raises LabError naming the node when a step fails."""
    files = node_files(node, members, pki, bin_dir)
    paths = " ".join(shlex.quote(f.path) for f in files)
    out = _ssh(
        node, f"sha256sum {paths} 2>/dev/null; echo ---; cat {CONTAINERD_CONF} 2>/dev/null; true",
        timeout=120,
    )  # fmt: skip
    sums, _, current_conf = out.partition("---\n")
    have = {}
    for line in sums.splitlines():
        digest, _, path = line.partition("  ")
        have[path] = digest
    changed = [f for f in files if have.get(f.path) != hashlib.sha256(f.data).hexdigest()]
    patched = containerd_patched(current_conf)
    if patched != current_conf:
        changed.append(NodeFile(CONTAINERD_CONF, patched.encode()))
    names = tuple(f.path for f in changed)
    if changed:
        try:
            proc = subprocess.run(
                nodes.ssh_command(node, _INSTALL), input=_tar(changed), capture_output=True,
                timeout=600, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{node.name}: copying the kubelet's files took over 600 s") from exc
        if proc.returncode != 0:
            raise LabError(f"{node.name}: copying {', '.join(names)} failed: "
                           f"{proc.stderr.decode(errors='replace').strip()}")  # fmt: skip
    steps = ["systemctl daemon-reload"] if any(n.endswith(".service") for n in names) else []
    if CONTAINERD_CONF in names:
        steps.append("systemctl restart containerd")
    verb = "restart" if changed else "start"
    steps.append(f"systemctl enable kubelet && systemctl {verb} kubelet")
    _ssh(node, " && ".join(steps), timeout=180)
    return JoinResult(node.name, names)


def leave(node: layout.LabNode) -> None:
    """Stop and disable the node's kubelet (the cluster is going away); its files stay."""
    _ssh(node, "systemctl disable --now kubelet 2>/dev/null || true", timeout=120)
