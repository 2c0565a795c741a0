"""Where the local lab keeps its files, and the fixed addresses its nodes use.

The lab's addresses are constants so that the inventory can be produced from config.txt
alone, without asking a running lab anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Host-side loopback port of node i's sshd is SSH_PORT_BASE + i (node1 -> 2221).
#: A second lab on the same host needs other ports (and its own APULL_LAB_STATE).
SSH_PORT_BASE = int(os.environ.get("APULL_LAB_SSH_PORT_BASE", "2220"))
#: Address of node i on the private lab network (the second NIC) is LAN_PREFIX + (10 + i).
LAN_PREFIX = "10.10.0."
LAN_MASK_BITS = 24
#: The lab's Kubernetes control plane on the private lab network (LAB_KUBERNETES=yes).
CONTROL_PLANE_ADDR = f"{LAN_PREFIX}1"
#: Host-side loopback port that reaches the lab's apiserver (for this machine's kubectl).
HOST_KUBE_PORT = int(os.environ.get("APULL_LAB_KUBE_PORT", "6443"))
#: The registry as the nodes see it (QEMU forwards this address to the host's registry).
GUEST_REGISTRY_ADDR = "10.0.2.100"
REGISTRY_PORT = 5000
#: The registry as the host sees it.
HOST_REGISTRY_ADDR = "127.0.0.1"
HOST_REGISTRY_PORT = int(os.environ.get("APULL_LAB_REGISTRY_PORT", str(REGISTRY_PORT)))
#: Name of the lab registry inside every node's /etc/hosts.
REGISTRY_NAME = "registry.lab"
#: A registry mirror as the nodes see it (QEMU forwards ADDR:REGISTRY_PORT to the host's
#: loopback port HOST_MIRROR_PORT, where a test may run a pull-through cache; nothing answers
#: there otherwise).
GUEST_MIRROR_ADDR = "10.0.2.102"
HOST_MIRROR_PORT = int(os.environ.get("APULL_LAB_MIRROR_PORT", str(HOST_REGISTRY_PORT + 1)))
#: The lab's package repository as the nodes see it (QEMU forwards ADDR:80 to the host's
#: repository server), its name in every node's /etc/hosts, and its port on the host's loopback.
GUEST_REPO_ADDR = "10.0.2.101"
REPO_NAME = "repo.lab"
HOST_REPO_PORT = int(os.environ.get("APULL_LAB_REPO_PORT", "8081"))
MAX_NODES = 8
#: Lab node image variants: with rebuilt on-demand modules + fs_ctl, Debian's stock modules,
#: on-demand with a Debian 11 userland (python3 3.9, glibc 2.31), on-demand Debian 12 arm64
#: (aarch64, under qemu-system-aarch64), or Debian 11 on its own stock 5.10 kernel, booted
#: by GRUB from its disk.
VARIANTS = ("ondemand", "stock", "bullseye", "arm64", "kernel510")
#: Variants whose nodes boot through a boot loader on their disk (so that installing a kernel
#: and rebooting really changes the kernel); the others boot QEMU's -kernel/-initrd.
DISK_BOOTED = ("kernel510",)


def variant_arch(variant: str) -> str:
    """The Debian architecture of a variant's nodes: arm64 for "arm64", amd64 for the rest."""
    return "arm64" if variant == "arm64" else "amd64"


def cache_dir() -> Path:
    """Built artefacts kept across labs (base image, modules, lab key)."""
    return Path(os.environ.get("APULL_LAB_CACHE", "/var/cache/apull-lab"))


def state_dir() -> Path:
    """Runtime state of the running lab (node overlays, pid files, logs, registry data)."""
    return Path(os.environ.get("APULL_LAB_STATE", "/var/lib/apull-lab"))


def repo_dir() -> Path:
    """The lab's package repository build: repo/ (a flat apt repository) and its ISO image."""
    return cache_dir() / "package-repo"


def kube_dir() -> Path:
    """The lab cluster's state: certificates, kubeconfigs, etcd data, control-plane logs."""
    return state_dir() / "kubernetes"


def admin_kubeconfig() -> Path:
    """The lab cluster's admin kubeconfig; KUBECONFIG_PATH defaults to it (LAB_KUBERNETES)."""
    return kube_dir() / "admin.kubeconfig"


def ssh_key_path() -> Path:
    return cache_dir() / "lab_ed25519"


def node_name(index: int) -> str:
    return f"node{index}"


def node_ssh_port(index: int) -> int:
    return SSH_PORT_BASE + index


def node_lan_addr(index: int) -> str:
    return f"{LAN_PREFIX}{10 + index}"


@dataclass(frozen=True)
class LabNode:
    """One lab node as the lab and the inventory both see it."""

    index: int
    variant: str

    @classmethod
    def from_name(cls, name: str, variant: str) -> LabNode:
        if not (name.startswith("node") and name[4:].isdigit()):
            raise ValueError(f"not a lab node name: {name!r}")
        return cls(int(name[4:]), variant)

    @property
    def name(self) -> str:
        return node_name(self.index)

    @property
    def ssh_port(self) -> int:
        return node_ssh_port(self.index)

    @property
    def lan_addr(self) -> str:
        return node_lan_addr(self.index)


def guest_registry() -> str:
    return f"{REGISTRY_NAME}:{REGISTRY_PORT}"


def host_registry() -> str:
    return f"{HOST_REGISTRY_ADDR}:{HOST_REGISTRY_PORT}"


def guest_repo_url() -> str:
    """The package repository as the nodes' apt sees it."""
    return f"http://{REPO_NAME}/"


def host_repo() -> str:
    """The package repository server as the host sees it (the host's loopback)."""
    return f"{HOST_REGISTRY_ADDR}:{HOST_REPO_PORT}"
