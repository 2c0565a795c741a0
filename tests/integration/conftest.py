"""Integration tests run against the lab's real QEMU nodes (`make lab-up` first)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import testinfra

from apull.cli import lab_nodes
from apull.config import default_config_path, load_config
from apull.kube.kubectl import Kubectl
from apull.lab import layout, nodes

ROOT = Path(__file__).resolve().parents[2]
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
SSH_ARGS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"


def _lab() -> list[layout.LabNode]:
    cfg = load_config(default_config_path())
    if cfg.target != "lab":
        pytest.skip("integration tests need TARGET=lab in config.txt")
    return lab_nodes(cfg)


@pytest.fixture(scope="session")
def lab() -> list[layout.LabNode]:
    found = _lab()
    down = [n.name for n in found if not nodes.NodeDir(n).running()]
    if down:
        pytest.fail(f"lab nodes not running: {', '.join(down)} (run: make lab-up)")
    # `make all` or an earlier session may have upgraded the stock nodes: start from the
    # lab config.txt describes.
    restore_configured_state(found)
    return found


def host_for(node: layout.LabNode) -> testinfra.host.Host:
    return testinfra.get_host(
        f"ssh://root@127.0.0.1:{node.ssh_port}",
        ssh_identity_file=str(layout.ssh_key_path()),
        ssh_extra_args=SSH_ARGS,
        controlpersist=120,
    )


@pytest.fixture(scope="session")
def hosts(lab: list[layout.LabNode]) -> dict[str, testinfra.host.Host]:
    return {n.name: host_for(n) for n in lab}


@pytest.fixture(scope="session")
def ondemand_nodes(lab: list[layout.LabNode]) -> list[layout.LabNode]:
    found = [n for n in lab if n.variant == "ondemand"]
    if not found:
        pytest.skip("no lab node in the ondemand variant")
    return found


@pytest.fixture(scope="session")
def stock_nodes(lab: list[layout.LabNode]) -> list[layout.LabNode]:
    found = [n for n in lab if n.variant == "stock"]
    if not found:
        pytest.skip("no lab node in the stock variant (LAB_STOCK_NODES)")
    return found


def run_on(node: layout.LabNode, command: str) -> subprocess.CompletedProcess[str]:
    return nodes.ssh(node, command, timeout=120)


def lab_log(message: str) -> None:
    print(f"[lab] {message}")


@pytest.fixture(scope="session")
def kube() -> Kubectl:
    """kubectl on the lab's Kubernetes cluster (make integration-kube); skips without one."""
    cfg = load_config(default_config_path())
    if not cfg.lab_kubernetes or cfg.kubeconfig_path is None:
        pytest.skip("the lab runs no Kubernetes (LAB_KUBERNETES=yes: make integration-kube)")
    return Kubectl(cfg.kubeconfig_path)


def reset_nodes(wanted: list[layout.LabNode]) -> None:
    """Boot these nodes fresh from their variant's image (all at once)."""
    from apull.lab import lab as lab_control

    lab_control.reset(wanted, lab_log)


def restore_configured_state(lab: list[layout.LabNode]) -> None:
    """Reset the nodes that an earlier test or `make all` moved away from their variant."""
    from apull.lab import lab as lab_control

    stale = [n for n in lab if lab_control.diverged(n)]
    if stale:
        reset_nodes(stale)


def apull(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run the suite's CLI as an operator would, from the checkout."""
    return subprocess.run(
        [sys.executable, "-m", "apull.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def recap(output: str) -> dict[str, tuple[int, int, int, int]]:
    """PLAY RECAP per host: (ok, changed, unreachable, failed)."""
    return {m[1]: (int(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in RECAP.finditer(output)}


def boot_id(node: layout.LabNode) -> str:
    return run_on(node, "cat /proc/sys/kernel/random/boot_id").stdout.strip()


def package_installed(node: layout.LabNode) -> bool:
    """Whether the lab's kernel upgrade (the on-demand modules package) is installed."""
    from apull.lab.lab import MODULES_PACKAGE

    res = run_on(node, f"dpkg-query -W -f='${{Status}}' {MODULES_PACKAGE} 2>/dev/null")
    return res.stdout.strip() == "install ok installed"
