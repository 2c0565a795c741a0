"""The lab as a real Kubernetes cluster (make integration-kube: tests/integration/kube.txt).

The control plane runs on this machine on the lab network; every node runs a kubelet on its
containerd. Nothing here is faked: kubectl talks to a real apiserver, real kubelets start
pods of the lab registry's image, and CNI gives them addresses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, apull, run_on

from apull.config import default_config_path, load_config
from apull.lab import kube_cluster, kube_control, kube_nodes, layout

NAMESPACE = "apull-lab-test"
IMAGE = f"{layout.guest_registry()}/lab/busybox:latest"


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    cfg = load_config(default_config_path())
    if not cfg.lab_kubernetes:
        pytest.skip("the lab runs no Kubernetes (LAB_KUBERNETES=yes: make integration-kube)")


def kubectl(*args: str, stdin: str | None = None, timeout: float = 120) -> str:
    res = subprocess.run(
        [kube_cluster.kubectl(), f"--kubeconfig={layout.admin_kubeconfig()}", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert res.returncode == 0, f"kubectl {' '.join(args)}: {res.stderr}"
    return res.stdout


@pytest.fixture
def namespace() -> Iterator[str]:
    kubectl("create", "namespace", NAMESPACE)
    yield NAMESPACE
    kubectl("delete", "namespace", NAMESPACE, "--wait=true", timeout=300)


def test_every_node_is_ready_with_its_kubelet(lab: list[layout.LabNode]) -> None:
    items = json.loads(kubectl("get", "nodes", "-o", "json"))["items"]
    by_name = {i["metadata"]["name"]: i for i in items}
    assert sorted(by_name) == sorted(n.name for n in lab)
    for node in lab:
        item = by_name[node.name]
        ready = [c for c in item["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", (node.name, ready)
        addrs = {a["type"]: a["address"] for a in item["status"]["addresses"]}
        assert addrs["InternalIP"] == node.lan_addr
        info = item["status"]["nodeInfo"]
        assert info["kubeletVersion"] == "v1.20.2"
        assert info["containerRuntimeVersion"].startswith("containerd://1.6")
        res = run_on(node, "systemctl is-active kubelet; pgrep -x kubelet >/dev/null && echo pid")
        assert res.stdout.split() == ["active", "pid"], (node.name, res.stdout, res.stderr)


def test_pods_run_with_addresses_from_their_node_range(
    lab: list[layout.LabNode], namespace: str
) -> None:
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "sleeper", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "sleeper"}},
            "template": {
                "metadata": {"labels": {"app": "sleeper"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": IMAGE, "command": ["sleep", "3600"]}],
                },
            },
        },
    }
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    deadline = time.monotonic() + 600
    pods: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        if len(running) == len(lab):
            break
        time.sleep(3)
    else:
        pytest.fail(f"not every pod Running after 600 s: {[p['status'] for p in pods]}")
    by_node = {n.name: n for n in lab}
    for pod in pods:
        spec, status = pod["spec"], pod["status"]
        node = by_node[spec["nodeName"]]
        net = ipaddress.ip_network(kube_nodes.pod_cidr(node))
        assert ipaddress.ip_address(status["podIP"]) in net, (node.name, status)
    # The apiserver reaches each kubelet over the lab network (exec, with its serving cert).
    for pod in pods:
        name = pod["metadata"]["name"]
        out = kubectl("exec", "-n", namespace, name, "--", "cat", "/etc/motd")
        assert out == "apull lab test image\n"
    # Each node reaches the pods on the other nodes by their own addresses (the routes over
    # the lab network; no NAT).
    for node in lab:
        for pod in pods:
            if pod["spec"]["nodeName"] != node.name:
                ip = pod["status"]["podIP"]
                res = run_on(node, f"ping -c 1 -W 5 {ip}")
                assert res.returncode == 0, (node.name, ip, res.stdout, res.stderr)


def test_a_node_cannot_act_for_another(lab: list[layout.LabNode]) -> None:
    """Each kubelet has its own identity: the Node authorizer and NodeRestriction hold node1's
    credentials to node1."""
    first, other = lab[0], lab[1]
    conf = run_on(first, "cat /etc/kubernetes/kubelet.kubeconfig").stdout
    local = layout.kube_dir() / f"test-{first.name}.kubeconfig"
    local.write_text(conf)
    local.chmod(0o600)
    try:
        base = [kube_cluster.kubectl(), f"--kubeconfig={local}",
                f"--server={kube_control.host_api_url()}"]  # fmt: skip
        own = subprocess.run([*base, "get", "node", first.name], capture_output=True, text=True)
        assert own.returncode == 0, own.stderr
        label = [*base, "label", "node", other.name, "apull.io/test=1", "--overwrite"]
        res = subprocess.run(label, capture_output=True, text=True)
        assert res.returncode != 0
        assert "forbidden" in res.stderr.lower(), res.stderr
    finally:
        local.unlink()


def test_second_lab_up_changes_nothing(lab: list[layout.LabNode]) -> None:
    before = {n.name: _kubelet_started(n) for n in lab}
    plane = _control_plane()
    res = apull("lab", "up", timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    said = res.stdout + res.stderr  # progress lines go to stderr, the status table to stdout
    for node in lab:
        assert f"{node.name}: kubelet joined (unchanged)" in said, said
    assert {n.name: _kubelet_started(n) for n in lab} == before
    assert _control_plane() == plane  # same processes, same certificates
    status = apull("lab", "status", timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = [line for line in status.stdout.splitlines() if line.lstrip("│ ").startswith("node")]
    cells = [[c.strip() for c in row.split("│")] for row in rows]
    assert len(rows) == len(lab), status.stdout
    assert all(c[-2] == "Ready" for c in cells), status.stdout


def test_the_documents_daemonset_test_times_each_nodes_pull(lab: list[layout.LabNode]) -> None:
    """`apull k8s-test IMAGE`: a DaemonSet on every Ready node; per node kubelet's pull time
    (the image removed from the nodes first, so kubelet pulls it) and the time to Running;
    then everything it made is gone. Run again, kubelet pulls nothing and it says so."""
    for node in lab:
        res = run_on(node, "for r in $(ctr -n k8s.io images ls -q | grep lab/busybox); do "
                           'ctr -n k8s.io images rm "$r" >/dev/null; done; '
                           "ctr -n k8s.io images ls -q | grep -c lab/busybox || true")  # fmt: skip
        assert res.stdout.strip() == "0", (node.name, res.stdout, res.stderr)
    first = apull("k8s-test", IMAGE, "--command", "sleep 1000000", timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for node in lab:
        row = re.search(
            rf"^\W*{node.name}\s+│\s+apull-k8s-test-\w+\s+│\s+(\d+\.\d\d) s\s+│\s+(\d+\.\d) s",
            first.stdout, re.M,
        )  # fmt: skip
        assert row, (node.name, first.stdout)
        pull, running = float(row[1]), float(row[2])
        assert 0 < pull < running, (node.name, pull, running)
    res = subprocess.run(
        [kube_cluster.kubectl(), f"--kubeconfig={layout.admin_kubeconfig()}", "get",
         "namespace", "apull-k8s-test"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode != 0 and "NotFound" in res.stderr, res.stdout + res.stderr
    again = apull("k8s-test", IMAGE, "--command", "sleep 1000000", timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for node in lab:
        assert re.search(rf"^\W*{node.name}\s+│.*│\s+already present\s+│", again.stdout, re.M), (
            node.name, again.stdout,
        )  # fmt: skip


def _control_plane() -> dict[str, str]:
    """The control plane's pids and the digests of its certificates and keys."""
    kube = layout.kube_dir()
    found = {p.name: p.read_text().strip() for p in kube.glob("*.pid")}
    for path in sorted((kube / "pki").iterdir()):
        found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _kubelet_started(node: layout.LabNode) -> str:
    res = run_on(node, "systemctl show -p ActiveEnterTimestampMonotonic --value kubelet")
    return res.stdout.strip()


OLD_CHART = ROOT / "tests/integration/fixtures/old-apull-chart"


def helm(*args: str, timeout: float = 300) -> str:
    res = subprocess.run(
        [str(Path(sys.executable).with_name("helm")), f"--kubeconfig={layout.admin_kubeconfig()}",
         *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert res.returncode == 0, f"helm {' '.join(args)}: {res.stderr}"
    return res.stdout


def test_cluster_cleanup_removes_an_earlier_helm_install_and_nothing_else(
    lab: list[layout.LabNode],
) -> None:
    """The documents' `make all` first removes their Helm-based install (release
    apull-snapshotter in apull-install, pods apull-snapshotter-setup-*): so does
    playbooks/cluster_cleanup.yml. A stand-in chart plays the earlier install (the real one
    is not here)."""
    helm("install", "apull-snapshotter", str(OLD_CHART), "--namespace", "apull-install",
         "--create-namespace", "--wait", "--timeout", "600s")  # fmt: skip
    kubectl("create", "configmap", "kept", "-n", "apull-install", "--from-literal=a=b")
    kubectl("create", "namespace", "apull-lab-bystander")
    helm("install", "bystander", str(OLD_CHART), "--namespace", "apull-lab-bystander", "--wait",
         "--timeout", "600s")  # fmt: skip
    try:
        pods = kubectl("get", "pods", "-n", "apull-install", "-o", "name").split()
        assert len(pods) == len(lab) and all("apull-snapshotter-setup-" in p for p in pods)
        res = apull("run", "cluster_cleanup", "--no-lab", timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        assert (
            f"removed Helm release apull-install/apull-snapshotter with {len(lab)} pod(s): "
            in res.stdout
        ), res.stdout[-3000:]
        assert kubectl("get", "pods", "-n", "apull-install", "-o", "name").split() == []
        assert "apull-snapshotter" not in helm("list", "-n", "apull-install", "-q").split()
        # Nothing else touched: its namespace, a ConfigMap in it, another release.
        assert kubectl("get", "configmap", "kept", "-n", "apull-install", "-o", "name").strip()
        assert helm("list", "-n", "apull-lab-bystander", "-q").split() == ["bystander"]
        again = apull("run", "cluster_cleanup", "--no-lab", timeout=900)
        assert again.returncode == 0, again.stdout[-3000:]
        assert "no earlier Helm-based install (apull-install/apull-snapshotter)" in again.stdout
        assert re.search(r"^localhost\s.*changed=0\s", again.stdout, re.M), again.stdout[-2000:]
    finally:
        helm("uninstall", "bystander", "--namespace", "apull-lab-bystander")
        kubectl("delete", "namespace", "apull-lab-bystander", "apull-install", "--wait=true",
                "--ignore-not-found", timeout=300)  # fmt: skip
