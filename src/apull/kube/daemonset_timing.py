"""The documents' test as a command (`apull k8s-test IMAGE`, `make k8s-test IMAGE=...`).

A DaemonSet of the image on every Ready node (tolerating the control-plane taints, as the
documents' `cuda-minimal` DaemonSet does), watched until each pod is Running; then, per
node, the image pull time that kubelet reported ("Successfully pulled image ... in 2.5s")
and the time from the DaemonSet's creation to the pod's container Running, as seen here.
The DaemonSet (and the namespace, when this made it) is removed afterwards, also after a
failure or Ctrl-C.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from apull.kube.kubectl import Kubectl, KubeError

DEFAULT_NAMESPACE = "apull-k8s-test"
DEFAULT_NAME = "apull-k8s-test"
#: Taints a control-plane node carries (1.20 and later releases).
CONTROL_PLANE_TAINTS = ("node-role.kubernetes.io/master", "node-role.kubernetes.io/control-plane")
POLL_SECONDS = 0.5

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
#: 1.20: `... in 2.5s`; later kubelets add `(2.6s including waiting). Image size: N bytes.`
_PULLED = re.compile(
    r'^Successfully pulled image "(?P<image>[^"]+)" '
    r"in (?P<took>(?:[0-9.]+(?:ns|us|µs|μs|ms|s|m|h))+)"
)
_PRESENT = re.compile(r'^Container image "(?P<image>[^"]+)" already present on machine$')


class DaemonSetTestError(RuntimeError):
    """The test could not finish; the message names the pods and what they wait for."""


@dataclass(frozen=True)
class NodeTiming:
    node: str
    pod: str
    #: kubelet's pull time in seconds; None when kubelet did not pull (see `pull_note`).
    pull_seconds: float | None
    #: "pulled", or "already present" (the image was on the node: nothing was pulled).
    pull_note: str
    #: From the DaemonSet's creation until its pod's container was seen Running.
    running_seconds: float


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string as kubelet prints it: 1.5s, 850.2ms, 2m3.4s."""
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    for match in _GO_DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"not a Go duration: {text!r}")
    return total


def pull_result(events: Iterable[Mapping[str, Any]], pod: str) -> tuple[float | None, str] | None:
    """kubelet's last "Pulled" event of `pod`: (seconds, "pulled"), (None, "already
    present"), or None when there is none yet."""
    found: tuple[float | None, str] | None = None
    for event in events:
        obj = event.get("involvedObject", {})
        if obj.get("kind") != "Pod" or obj.get("name") != pod or event.get("reason") != "Pulled":
            continue
        message = str(event.get("message", ""))
        pulled = _PULLED.match(message)
        if pulled:
            found = (parse_go_duration(pulled.group("took")), "pulled")
        elif _PRESENT.match(message):
            found = (None, "already present")
    return found


def manifest(
    name: str, namespace: str, image: str, nodes: list[str], command: str | None
) -> dict[str, Any]:
    """The DaemonSet: one pod on each of `nodes` (by name), the control-plane taints
    tolerated; `command`, when given, runs with sh -c instead of the image's own."""
    container: dict[str, Any] = {"name": "image", "image": image, "imagePullPolicy": "IfNotPresent"}
    if command is not None:
        container["command"] = ["sh", "-c", command]
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "apull-k8s-test"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "tolerations": [
                        {"key": key, "operator": "Exists", "effect": "NoSchedule"}
                        for key in CONTROL_PLANE_TAINTS
                    ],
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                # One term per node (terms are ORed): a field
                                # selector takes one value only.
                                "nodeSelectorTerms": [
                                    {
                                        "matchFields": [
                                            {
                                                "key": "metadata.name",
                                                "operator": "In",
                                                "values": [node],
                                            }
                                        ]
                                    }
                                    for node in sorted(nodes)
                                ]
                            }
                        }
                    },
                    "containers": [container],
                },
            },
        },
    }


def ready_nodes(kube: Kubectl) -> list[str]:
    names = []
    for item in kube.get("nodes").get("items", []):
        conditions = item.get("status", {}).get("conditions", [])
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            names.append(str(item["metadata"]["name"]))
    return sorted(names)


def _waiting_reason(pod: Mapping[str, Any]) -> str:
    status = pod.get("status", {})
    for cs in status.get("containerStatuses", []) or []:
        state = cs.get("state", {})
        for key in ("waiting", "terminated"):
            if key in state:
                detail = state[key]
                reason = detail.get("reason", key)
                message = detail.get("message")
                return f"{reason}: {message}" if message else str(reason)
    return str(status.get("phase", "no status yet"))


def _is_running(pod: Mapping[str, Any]) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses", []) or []
    return bool(statuses) and all("running" in cs.get("state", {}) for cs in statuses)


def run(
    kube: Kubectl,
    image: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    name: str = DEFAULT_NAME,
    command: str | None = None,
    timeout: float = 900.0,
    keep: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> list[NodeTiming]:
    """Create the DaemonSet, wait until every pod is Running, read kubelet's pull times,
    remove it. Raises DaemonSetTestError when a pod is not Running within `timeout`."""
    nodes = ready_nodes(kube)
    if not nodes:
        raise DaemonSetTestError("no node is Ready: nothing to run the DaemonSet on")
    if kube.exists("daemonset", name, "-n", namespace):
        raise DaemonSetTestError(
            f"daemonset {namespace}/{name} exists already (an earlier run kept it?): "
            f"kubectl delete daemonset -n {namespace} {name}"
        )
    made_namespace = not kube.exists("namespace", namespace)
    if made_namespace:
        kube.run("create", "namespace", namespace)
    try:
        started = time.monotonic()
        kube.create(manifest(name, namespace, image, nodes, command))
        say(f"daemonset {namespace}/{name} of {image} on {len(nodes)} node(s): {', '.join(nodes)}")
        running = _wait_running(kube, namespace, name, nodes, started, timeout, say)
        return _timings(kube, namespace, running, timeout)
    finally:
        if not keep:
            _remove(kube, namespace, name, made_namespace, say)


def _wait_running(
    kube: Kubectl,
    namespace: str,
    name: str,
    nodes: list[str],
    started: float,
    timeout: float,
    say: Callable[[str], None],
) -> dict[str, tuple[str, float]]:
    """node -> (pod, seconds until Running)."""
    running: dict[str, tuple[str, float]] = {}
    pods: list[dict[str, Any]] = []
    while time.monotonic() - started < timeout:
        pods = kube.get("pods", "-n", namespace, "-l", f"app.kubernetes.io/name={name}")["items"]
        now = time.monotonic() - started
        for pod in pods:
            node = pod.get("spec", {}).get("nodeName")
            if node in nodes and node not in running and _is_running(pod):
                running[node] = (pod["metadata"]["name"], now)
                say(f"{node}: {pod['metadata']['name']} Running after {now:.1f} s "
                    f"({len(running)}/{len(nodes)})")  # fmt: skip
        if len(running) == len(nodes):
            return running
        time.sleep(POLL_SECONDS)
    by_node = {p.get("spec", {}).get("nodeName"): p for p in pods}
    waiting = [
        f"{node}: {by_node[node]['metadata']['name']} {_waiting_reason(by_node[node])}"
        if node in by_node
        else f"{node}: no pod"
        for node in nodes
        if node not in running
    ]
    raise DaemonSetTestError(
        f"not Running after {timeout:.0f} s on {len(waiting)} of {len(nodes)} node(s):\n  "
        + "\n  ".join(waiting)
    )


def _timings(
    kube: Kubectl, namespace: str, running: dict[str, tuple[str, float]], timeout: float
) -> list[NodeTiming]:
    """Per node, with kubelet's pull event (events can trail the pod status a little)."""
    deadline = time.monotonic() + min(timeout, 30.0)
    while True:
        events = kube.get("events", "-n", namespace)["items"]
        pulls = {node: pull_result(events, pod) for node, (pod, _) in running.items()}
        missing = sorted(node for node, pull in pulls.items() if pull is None)
        if not missing:
            break
        if time.monotonic() > deadline:
            raise DaemonSetTestError(f"no 'Pulled' event from kubelet for: {', '.join(missing)}")
        time.sleep(POLL_SECONDS)
    timings = []
    for node, (pod, seconds) in sorted(running.items()):
        pull = pulls[node]
        assert pull is not None
        timings.append(NodeTiming(node, pod, pull[0], pull[1], seconds))
    return timings


def _remove(
    kube: Kubectl, namespace: str, name: str, namespace_too: bool, say: Callable[[str], None]
) -> None:
    try:
        kube.run("delete", "daemonset", name, "-n", namespace, "--ignore-not-found",
                 "--wait=true", timeout=300)  # fmt: skip
        deadline = time.monotonic() + 300
        selector = f"app.kubernetes.io/name={name}"
        while kube.get("pods", "-n", namespace, "-l", selector)["items"]:
            if time.monotonic() > deadline:
                raise KubeError(f"its pods are still there after 300 s ({selector})")
            time.sleep(POLL_SECONDS)
        if namespace_too:
            kube.run("delete", "namespace", namespace, "--wait=true", timeout=300)
        say(
            f"removed daemonset {namespace}/{name}"
            + (" and its namespace" if namespace_too else "")
        )
    except KubeError as err:
        say(f"could not remove daemonset {namespace}/{name}: {err}")
