"""Kernel upgrades drain real Kubernetes nodes (make integration-kube: tests/integration/kube.txt).

The last node is booted as a stock node (no on-demand support) and joined to the lab's
cluster; real workloads run on it: a Deployment spread over the nodes with a
PodDisruptionBudget that allows one eviction, a DaemonSet, and a Deployment pinned to the
node whose PodDisruptionBudget forbids any. The kernel role's drain is real `kubectl drain`
against the real apiserver, whose eviction API enforces the budgets.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from conftest import apull, boot_id, lab_log, package_installed, recap, run_on

from apull.kube.kubectl import Kubectl
from apull.lab import lab as lab_control
from apull.lab import layout

NS = "apull-drain-test"
IMAGE = f"{layout.guest_registry()}/lab/busybox:latest"
SLEEP = ["sleep", "1000000"]


@pytest.fixture
def stock_last(kube: Kubectl, lab: list[layout.LabNode]) -> Iterator[layout.LabNode]:
    """The last node re-created as a stock node and joined; the configured lab again after."""
    target = lab[-1]
    as_stock = [layout.LabNode(n.index, "stock") if n is target else n for n in lab]
    try:
        lab_control.up(as_stock, lab_log, kubernetes=True)
        _wait_nodes(kube, {n.name for n in lab})
        yield as_stock[-1]
    finally:
        kube.run("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=300)
        lab_control.up(lab, lab_log, kubernetes=True)


def _wait_nodes(kube: Kubectl, names: set[str], timeout: float = 600) -> None:
    """Every node Ready and schedulable."""
    deadline = time.monotonic() + timeout
    state: dict[str, tuple[bool, bool]] = {}
    while time.monotonic() < deadline:
        state = {i["metadata"]["name"]: _ready_schedulable(i) for i in kube.get("nodes")["items"]}
        if set(state) >= names and all(state[n] == (True, True) for n in names):
            return
        time.sleep(3)
    pytest.fail(f"nodes not Ready and schedulable after {timeout:.0f} s: {state}")


def _ready_schedulable(item: dict[str, Any]) -> tuple[bool, bool]:
    ready = any(
        c["type"] == "Ready" and c["status"] == "True" for c in item["status"]["conditions"]
    )
    return ready, not item["spec"].get("unschedulable", False)


def _pod_spec(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "c", "image": IMAGE, "command": SLEEP}],
    }
    return {**spec, **(extra or {})}


def _deployment(name: str, replicas: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec(extra)},
        },
    }


def _pdb(name: str, app: str, budget: dict[str, int]) -> dict[str, Any]:
    # policy/v1beta1: the lab's 1.20 has no policy/v1.
    return {
        "apiVersion": "policy/v1beta1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": app}}, **budget},
    }


def _workloads(node: str, nodes: int) -> list[dict[str, Any]]:
    spread = {
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": {"app": "web"}},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        }
    }
    agent = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}}, "spec": _pod_spec()},
        },
    }
    return [
        _deployment("web", nodes, spread),
        _pdb("web", "web", {"maxUnavailable": 1}),
        agent,
        _deployment("pinned", 1, {"nodeSelector": {"kubernetes.io/hostname": node}}),
        _pdb("pinned", "pinned", {"minAvailable": 1}),
    ]


def _pods(kube: Kubectl) -> list[dict[str, Any]]:
    return list(kube.get("pods", "-n", NS)["items"])


def _running(pods: list[dict[str, Any]], app: str) -> list[dict[str, Any]]:
    return [
        p
        for p in pods
        if p["metadata"]["labels"].get("app") == app
        and p["status"].get("phase") == "Running"
        and not p["metadata"].get("deletionTimestamp")
    ]


def _wait_running(
    kube: Kubectl, wanted: dict[str, int], timeout: float = 600
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    pods: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        pods = _pods(kube)
        if all(len(_running(pods, app)) == n for app, n in wanted.items()):
            return pods
        time.sleep(3)
    states = [(p["metadata"]["name"], p["spec"].get("nodeName"), p["status"].get("phase"))
              for p in pods]  # fmt: skip
    pytest.fail(f"pods not Running after {timeout:.0f} s (want {wanted}): {states}")


def _on(pods: list[dict[str, Any]], app: str, node: str) -> list[dict[str, Any]]:
    return [p for p in _running(pods, app) if p["spec"].get("nodeName") == node]


def _uid(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["uid"])


def test_a_pdb_stops_the_drain_then_the_upgrade_evicts_and_reschedules(
    kube: Kubectl, lab: list[layout.LabNode], stock_last: layout.LabNode
) -> None:
    node = stock_last
    kube.run("create", "namespace", NS)
    for doc in _workloads(node.name, len(lab)):
        kube.run("apply", "-f", "-", stdin=yaml.safe_dump(doc))
    pods = _wait_running(kube, {"web": len(lab), "agent": len(lab), "pinned": 1})
    web_there = _on(pods, "web", node.name)
    (pinned,) = _on(pods, "pinned", node.name)
    (agent,) = _on(pods, "agent", node.name)
    assert web_there, f"no web pod landed on {node.name}: {[p['spec'] for p in pods]}"
    booted = boot_id(node)
    kernel = run_on(node, "uname -r").stdout.strip()

    # 1. The pinned pod's budget forbids its eviction: the drain times out, naming it; the
    #    node is not changed, and is schedulable again.
    blocked = apull("run", "kernel", "--no-lab", "-l", node.name,
                    "-e", "kernel_drain_timeout=40s", timeout=1200)  # fmt: skip
    out = blocked.stdout
    assert blocked.returncode != 0, out[-3000:]
    assert recap(out)[node.name][3] == 1, out[-3000:]
    assert f"blocked by {NS}/{pinned['metadata']['name']}." in out, out[-3000:]
    assert "Nothing was changed on the node; its kernel upgrade stops here" in out
    assert "It is uncordoned again." in out
    assert boot_id(node) == booted and not package_installed(node)
    assert run_on(node, "uname -r").stdout.strip() == kernel
    _wait_nodes(kube, {node.name}, timeout=60)
    pods = _wait_running(kube, {"web": len(lab), "agent": len(lab), "pinned": 1})
    # The web pod's budget allowed its eviction: it went, and its replacement runs elsewhere
    # (the node was cordoned when it was scheduled).
    assert not {_uid(p) for p in web_there} & {_uid(p) for p in _running(pods, "web")}
    assert not _on(pods, "web", node.name)
    assert [_uid(p) for p in _on(pods, "pinned", node.name)] == [_uid(pinned)]

    # 2. With the budget lifted the upgrade goes through: drained (the DaemonSet's pod stays),
    #    rebooted into the new kernel, uncordoned; the pinned pod was evicted and is
    #    rescheduled on the node once it is back.
    kube.run("delete", "pdb", "pinned", "-n", NS)
    upgraded = apull("run", "kernel", "--no-lab", "-l", node.name, timeout=1800)
    out = upgraded.stdout
    assert upgraded.returncode == 0, out[-4000:]
    assert recap(out)[node.name][1] > 0 and recap(out)[node.name][3] == 0
    assert boot_id(node) != booted and package_installed(node)
    _wait_nodes(kube, {node.name})
    pods = _wait_running(kube, {"web": len(lab), "agent": len(lab), "pinned": 1})
    (pinned_after,) = _on(pods, "pinned", node.name)
    assert _uid(pinned_after) != _uid(pinned)
    (agent_after,) = _on(pods, "agent", node.name)
    assert _uid(agent_after) == _uid(agent), "the DaemonSet's pod was evicted"
