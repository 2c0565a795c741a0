"""The lab as a Kubernetes cluster (LAB_KUBERNETES=yes): build (once), control plane, the
pause image in the lab's registry, a kubelet on every node, and each node's Ready state."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from apull.kube.kubectl import KubeError, kubectl_binary
from apull.lab import kube_build, kube_control, kube_nodes, layout
from apull.lab.kube_pki import Pki
from apull.lab.run import LabError, Log
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient

READY_TIMEOUT = 600.0


def kubectl() -> str:
    """This machine's kubectl (apull.kube.kubectl's choice)."""
    try:
        return kubectl_binary()
    except KubeError as err:
        raise LabError(str(err)) from err


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


@dataclass(frozen=True)
class NodeCondition:
    ready: str  #: the Ready condition's status: "True", "False" or "Unknown"
    heartbeat: str  #: its lastHeartbeatTime, as the kubelet last posted it


def node_conditions() -> dict[str, NodeCondition]:
    """Each registered node's Ready condition."""
    try:
        res = kubectl_run("get", "nodes", "-o", "json", timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise LabError("kubectl get nodes: no answer from the apiserver in 30 s") from exc
    if res.returncode != 0:
        raise LabError(f"kubectl get nodes failed: {res.stderr.strip()}")
    found = {}
    for item in json.loads(res.stdout)["items"]:
        conditions = item.get("status", {}).get("conditions", [])
        ready: dict[str, str] = next((c for c in conditions if c["type"] == "Ready"), {})
        found[item["metadata"]["name"]] = NodeCondition(
            ready.get("status", "Unknown"), ready.get("lastHeartbeatTime", "")
        )
    return found


def node_ready() -> dict[str, str]:
    """Each registered node's Ready condition: "True", "False" or "Unknown"."""
    return {name: c.ready for name, c in node_conditions().items()}


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

    before = _conditions_or_empty()
    with ThreadPoolExecutor(max_workers=max(1, len(members))) as pool:
        outcomes = list(pool.map(_join_or_error(members, pki, bin_dir), members))
    errors = [o for o in outcomes if isinstance(o, LabError)]
    if errors:
        raise LabError("\n".join(str(e) for e in errors))
    results = [o for o in outcomes if isinstance(o, kube_nodes.JoinResult)]
    changed = {r.node: r.changed for r in results}
    for r in results:
        what = f"{len(r.changed)} file(s) changed" if r.changed else "unchanged"
        log(f"{r.node}: kubelet joined ({what})")
    # A restarted kubelet's node shows the old Ready for a while: wait for its new heartbeat.
    stale = {r.node: before[r.node].heartbeat for r in results if r.changed and r.node in before}
    ready_at: dict[str, float] = {}
    last_error = ""
    while len(ready_at) < len(members):
        try:
            states = node_conditions()
        except LabError as exc:  # the apiserver busy, or restarting: try again until the end
            states, last_error = {}, str(exc)
        for node in members:
            state = states.get(node.name)
            if node.name in ready_at or state is None or state.ready != "True":
                continue
            if node.name in stale and state.heartbeat == stale[node.name]:
                continue  # still the status from before the kubelet's restart
            ready_at[node.name] = time.monotonic() - started
            log(f"{node.name}: Ready after {ready_at[node.name]:.0f} s")
        if len(ready_at) < len(members):
            if time.monotonic() - started > READY_TIMEOUT:
                waiting = sorted({n.name for n in members} - set(ready_at))
                shown = {n: states[n].ready for n in waiting if n in states}
                extra = f"; {last_error}" if last_error else ""
                raise LabError(
                    f"not Ready after {READY_TIMEOUT:.0f} s: {', '.join(waiting)} "
                    f"(Ready: {shown or 'not registered'}{extra}); "
                    "see `journalctl -u kubelet` on the node"
                )
            time.sleep(2)
    return ClusterReport(plane, ready_at, changed)


def leave(members: list[layout.LabNode], log: Log) -> None:
    """Stop the kubelets of the running nodes among members (best effort: a node that does
    not answer is named and skipped)."""
    for node in members:
        try:
            kube_nodes.leave(node)
        except LabError as exc:
            log(f"{node.name}: kubelet not stopped: {exc}")


def forget(name: str, log: Log) -> None:
    """Remove a node that left the lab from the cluster (best effort)."""
    try:
        res = kubectl_run("delete", "node", name, "--ignore-not-found", timeout=60)
    except subprocess.TimeoutExpired:
        log(f"{name}: not removed from the cluster (the apiserver did not answer)")
        return
    if res.returncode != 0:
        log(f"{name}: not removed from the cluster: {res.stderr.strip()}")


def _conditions_or_empty() -> dict[str, NodeCondition]:
    try:
        return node_conditions()
    except LabError:
        return {}


def _join_or_error(
    members: list[layout.LabNode], pki: Pki, bin_dir: Path
) -> Callable[[layout.LabNode], kube_nodes.JoinResult | LabError]:
    """join() for one node, its LabError returned (so every node's failure is reported)."""

    def join(node: layout.LabNode) -> kube_nodes.JoinResult | LabError:
        try:
            return kube_nodes.join(node, members, pki, bin_dir)
        except LabError as exc:
            return exc

    return join


def down() -> None:
    """Stop the control plane and forget the cluster (its certificates and etcd data)."""
    kube_control.down()
    shutil.rmtree(layout.kube_dir(), ignore_errors=True)
