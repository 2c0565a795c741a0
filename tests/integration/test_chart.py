"""charts/apull on the lab's real cluster (make integration-kube: tests/integration/kube.txt).

The nodes start without apull (fresh from their image, joined to the cluster). Everything
the chart does goes through real helm, the real apiserver and kubelets, and its pods run the
suite's roles on each node's host through nsenter and a transient systemd unit:
install (apull in containerd, a pod of a converted image served lazily), an upgrade to a
new build (new binaries; running containers keep reading their image), a node reboot (its
pods and containers come back), and uninstall (containerd's config.toml byte for byte as
before, no apull mount left, ordinary pods run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, lab_log, run_on
from lazy_image import BIG, OTHER, LazyImage, push_and_convert

from apull.config import default_config_path
from apull.kube.kubectl import Kubectl
from apull.lab import lab as lab_control
from apull.lab import layout

NS = "apull-system"
RELEASE = "apull"
WORK_NS = "apull-chart-test"
CONFIG = "/etc/containerd/config.toml"
NODE_BINARIES = ("/usr/bin/apulld", "/usr/bin/apull-containerd-grpc")


def helm(*args: str, timeout: float = 2400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("helm")), f"--kubeconfig={layout.admin_kubeconfig()}",
         *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _chart_image(source: Path, env: dict[str, str] | None = None) -> str:
    """`apull chart-image` from the checkout at `source`: the reference nodes pull."""
    res = subprocess.run(
        [sys.executable, "-m", "apull.cli", "chart-image"],
        cwd=source, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


def _second_build(tmp: Path) -> str:
    """The same suite with a changed node package: another bundle, another image."""
    copy = tmp / "suite"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    for name in files:
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)
    marker = copy / "src/apull_node/service/__init__.py"
    marker.write_text(marker.read_text() + "# chart upgrade test: a new build\n")
    env = {
        "PYTHONPATH": str(copy / "src"),
        "APULL_WHEEL_CACHE": str(ROOT / ".apull" / "wheels"),
        "APULL_CONFIG": str(default_config_path()),
    }
    return _chart_image(copy, env)


@pytest.fixture(scope="module")
def bare_lab(kube: Kubectl, lab: list[layout.LabNode]) -> Iterator[list[layout.LabNode]]:
    """Every node fresh from its image (no apull) and joined; the stack off them after."""
    lab_control.reset(lab, lab_log)
    lab_control.up(lab, lab_log, kubernetes=True)
    yield lab
    helm("uninstall", RELEASE, "--namespace", NS, "--timeout", "30m")
    kube.run("delete", "namespace", WORK_NS, NS, "--ignore-not-found", "--wait=true",
             timeout=600)  # fmt: skip


def _sha(node: layout.LabNode, path: str) -> str:
    return run_on(node, f"sha256sum {path} 2>/dev/null | cut -d' ' -f1").stdout.strip()


def _install_args(reference: str) -> list[str]:
    repository, tag = reference.rsplit(":", 1)
    return [
        "--namespace", NS, "--wait", "--timeout", "40m",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", f"registry.host={layout.guest_registry()}", "--set", "registry.insecure=true",
        "--set", "nodeSettings.containerd_set_default_snapshotter=true",
        "--set", f"kubernetesApi.host={layout.CONTROL_PLANE_ADDR}",
        "--set", "kubernetesApi.port=6443", "--set-string", "maxUnavailable=100%",
    ]  # fmt: skip


def _rolled_out(kube: Kubectl) -> None:
    """Every node done: helm's --wait returns while maxUnavailable nodes still work."""
    kube.run("rollout", "status", f"daemonset/{RELEASE}", "-n", NS, "--timeout=40m",
             timeout=2500)  # fmt: skip


def _lazy_daemonset(image: LazyImage) -> dict[str, Any]:
    labels = {"app": "lazy"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "lazy", "namespace": WORK_NS},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "c", "image": image.ref,
                        "command": ["sh", "-c", "cat /data/hello; exec sleep 1000000"],
                    }],
                },
            },
        },
    }  # fmt: skip


def _pods(kube: Kubectl, namespace: str, app: str) -> dict[str, dict[str, Any]]:
    """node -> its Running, Ready pod of `app`."""
    found = {}
    for pod in kube.get("pods", "-n", namespace, "-l", f"app={app}")["items"]:
        statuses = pod["status"].get("containerStatuses") or []
        if statuses and all(s.get("ready") for s in statuses):
            found[pod["spec"]["nodeName"]] = pod
    return found


def _wait_pods(kube: Kubectl, namespace: str, app: str, nodes: list[str],
               timeout: float = 900) -> dict[str, dict[str, Any]]:  # fmt: skip
    deadline = time.monotonic() + timeout
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        found = _pods(kube, namespace, app)
        if sorted(found) == sorted(nodes):
            return found
        time.sleep(3)
    pods = kube.get("pods", "-n", namespace, "-o", "wide")["items"]
    pytest.fail(f"{app} not Ready on {nodes} after {timeout:.0f} s: "
                f"{[(p['spec'].get('nodeName'), p['status']) for p in pods]}")  # fmt: skip


def _exec(kube: Kubectl, pod: dict[str, Any], *command: str) -> str:
    return kube.run("exec", "-n", WORK_NS, pod["metadata"]["name"], "--", *command, timeout=600)


def _apull_mounts(node: layout.LabNode) -> list[str]:
    mounts = run_on(node, "cat /proc/mounts").stdout.splitlines()
    return [m for m in mounts if "containerd-apull" in m or " erofs " in m]


def test_the_chart_installs_upgrades_survives_a_reboot_and_uninstalls(
    bare_lab: list[layout.LabNode], kube: Kubectl, tmp_path: Path
) -> None:
    lab = bare_lab
    names = [n.name for n in lab]
    before = {n.name: run_on(n, f"cat {CONFIG}").stdout for n in lab}
    assert all(before.values())
    for node in lab:
        assert not _sha(node, NODE_BINARIES[0]), f"{node.name} has apull already"
    first = _chart_image(ROOT)
    image = push_and_convert()

    # 1. Install: apull in every node's containerd; a converted image runs lazily.
    res = helm("install", RELEASE, str(ROOT / "charts/apull"), "--create-namespace",
               *_install_args(first))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _rolled_out(kube)
    for node in lab:
        plugins = run_on(node, "ctr plugins ls | grep -w apull").stdout
        assert plugins.split()[-1:] == ["ok"], (node.name, plugins)
        active = run_on(node, "systemctl is-active apulld apull-snapshotter").stdout.split()
        assert active == ["active", "active"], (node.name, active)
    installed = {n.name: _sha(n, NODE_BINARIES[0]) for n in lab}
    kube.run("create", "namespace", WORK_NS)
    kube.run("apply", "-f", "-", stdin=yaml.safe_dump(_lazy_daemonset(image)))
    lazy = _wait_pods(kube, WORK_NS, "lazy", names)
    for node in lab:
        pod = lazy[node.name]
        log = kube.run("logs", "-n", WORK_NS, pod["metadata"]["name"])
        assert log == image.files["data/hello"].decode(), (node.name, log)
        ours = [m for m in _apull_mounts(node) if " erofs " in m]
        assert ours and all("fsid=" in m for m in ours), (node.name, ours)

    # 2. Upgrade to a new build: the binaries change; the running containers keep reading
    #    their image (a file none of them read yet, fetched through the new apulld).
    second = _second_build(tmp_path)
    assert second != first
    res = helm("upgrade", RELEASE, str(ROOT / "charts/apull"), *_install_args(second))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _rolled_out(kube)
    for node in lab:
        now = _sha(node, NODE_BINARIES[0])
        assert now and now != installed[node.name], node.name
    still = _pods(kube, WORK_NS, "lazy")
    for node in lab:
        pod = still[node.name]
        assert pod["metadata"]["uid"] == lazy[node.name]["metadata"]["uid"]
        out = _exec(kube, pod, "sha256sum", f"/{OTHER}")
        assert out.split()[0] == image.sha256(OTHER), (node.name, out)

    # 3. A node reboots while installed: its installer and its lazy pod come back.
    target = lab[-1]
    boot = run_on(target, "cat /proc/sys/kernel/random/boot_id").stdout
    lab_control.reset([target], lab_log, power_cycle=True)
    assert run_on(target, "cat /proc/sys/kernel/random/boot_id").stdout != boot
    _wait_pods(kube, WORK_NS, "lazy", names)
    back = _pods(kube, WORK_NS, "lazy")[target.name]
    out = _exec(kube, back, "sha256sum", f"/{BIG}")
    assert out.split()[0] == image.sha256(BIG), out
    deadline = time.monotonic() + 900
    installer = kube.get("daemonset", RELEASE, "-n", NS)["status"]
    while installer.get("numberReady") != len(lab) and time.monotonic() < deadline:
        time.sleep(5)
        installer = kube.get("daemonset", RELEASE, "-n", NS)["status"]
    assert installer.get("numberReady") == len(lab), installer

    # 4. Uninstall: config.toml byte for byte, no apull mount, the stack gone; ordinary pods.
    kube.run("delete", "daemonset", "lazy", "-n", WORK_NS, "--wait=true", timeout=600)
    res = helm("uninstall", RELEASE, "--namespace", NS, "--timeout", "40m")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for node in lab:
        after = run_on(node, f"cat {CONFIG}").stdout
        assert hashlib.sha256(after.encode()).hexdigest() == hashlib.sha256(
            before[node.name].encode()).hexdigest(), node.name  # fmt: skip
        assert _apull_mounts(node) == [], node.name
        assert not _sha(node, NODE_BINARIES[0]), node.name
        left = run_on(node, "ls -A /var/lib/apull-chart 2>/dev/null").stdout.split()
        assert left == [], (node.name, left)
    plain = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "plain", "namespace": WORK_NS},
        "spec": {
            "selector": {"matchLabels": {"app": "plain"}},
            "template": {
                "metadata": {"labels": {"app": "plain"}},
                "spec": {"containers": [{
                    "name": "c", "image": f"{layout.guest_registry()}/lab/busybox:latest",
                    "command": ["sleep", "1000000"],
                }]},
            },
        },
    }  # fmt: skip
    kube.run("apply", "-f", "-", stdin=json.dumps(plain))
    _wait_pods(kube, WORK_NS, "plain", names)
