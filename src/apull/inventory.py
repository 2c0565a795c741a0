"""The cluster model as an Ansible inventory, and as Fabric connection parameters.

The inventory never holds the SSH password itself: ``ansible_password`` is a lookup that
the ``apull.deploy.config_secret`` plugin resolves from config.txt when a connection needs
it. Only :func:`fabric_hosts` reveals the secret, because Fabric has no such indirection.

Standard library only: the inventory script imports this outside the venv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apull.config import ClusterConfig, Node

PASSWORD_LOOKUP = "{{ lookup('apull.deploy.config_secret', 'SSH_PASSWORD') }}"
NODES_GROUP = "apull_nodes"
LAB_GROUP = "lab"
#: Lab nodes are rebuilt often and all answer on 127.0.0.1, so their host keys are not kept.
LAB_SSH_ARGS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
SERVERS_SSH_ARGS = "-o StrictHostKeyChecking=accept-new"


@dataclass(frozen=True)
class FabricHost:
    """Arguments for ``fabric.Connection(host, port=, user=, connect_kwargs=)``."""

    name: str
    host: str
    port: int
    user: str
    #: key_filename and/or password (revealed); kept out of the repr.
    connect_kwargs: dict[str, str] = field(repr=False)


def _hostvars(cfg: ClusterConfig, node: Node) -> dict[str, Any]:
    hostvars: dict[str, Any] = {
        "ansible_host": node.host,
        "ansible_port": node.port,
        "ansible_user": node.user,
        "ansible_ssh_common_args": LAB_SSH_ARGS if cfg.target == "lab" else SERVERS_SSH_ARGS,
    }
    if cfg.ssh_key is not None:
        hostvars["ansible_ssh_private_key_file"] = str(cfg.ssh_key)
    if node.user != "root":
        # Everything the suite does on a node needs root.
        hostvars["ansible_become"] = True
    if cfg.ssh_password is not None:
        hostvars["ansible_password"] = PASSWORD_LOOKUP
        if node.user != "root":
            hostvars["ansible_become_password"] = PASSWORD_LOOKUP
    if node.lab_variant is not None:
        hostvars["apull_lab_variant"] = node.lab_variant
    # The node's address on the cluster network (peers reach each other there): the lab's
    # LAN address, else the address config.txt names.
    hostvars["apull_lan_addr"] = node.lan_addr if node.lan_addr is not None else node.host
    return hostvars


def build_inventory(cfg: ClusterConfig) -> dict[str, Any]:
    """The inventory in the JSON shape Ansible expects from ``script --list``."""
    names = [node.name for node in cfg.nodes]
    inventory: dict[str, Any] = {
        "all": {
            "children": [NODES_GROUP],
            "vars": {
                "apull_target": cfg.target,
                "apull_registry": cfg.registry,
                "apull_registry_insecure": cfg.registry_insecure,
                "apull_registry_mirrors": list(cfg.registry_mirrors),
                "apull_prewarm_images": list(cfg.prewarm_images),
                "apull_kubeconfig_path": str(cfg.kubeconfig_path or ""),
            },
        },
        NODES_GROUP: {"hosts": names},
    }
    if cfg.target == "lab":
        inventory["all"]["children"].append(LAB_GROUP)
        inventory[LAB_GROUP] = {"hosts": list(names)}
        # One group per image variant (lab_stock, lab_kernel510, ...): group_vars per kind.
        variants = sorted({n.lab_variant for n in cfg.nodes if n.lab_variant is not None})
        for variant in variants:
            group = f"{LAB_GROUP}_{variant}"
            inventory[LAB_GROUP].setdefault("children", []).append(group)
            inventory[group] = {"hosts": [n.name for n in cfg.nodes if n.lab_variant == variant]}
    inventory["_meta"] = {"hostvars": {node.name: _hostvars(cfg, node) for node in cfg.nodes}}
    return inventory


def fabric_hosts(cfg: ClusterConfig) -> list[FabricHost]:
    """One entry per node; the key is tried first, the password (if any) is the fallback."""
    connect_kwargs: dict[str, str] = {}
    if cfg.ssh_key is not None:
        connect_kwargs["key_filename"] = str(cfg.ssh_key)
    if cfg.ssh_password is not None:
        connect_kwargs["password"] = cfg.ssh_password.reveal()
    return [
        FabricHost(node.name, node.host, node.port, node.user, dict(connect_kwargs))
        for node in cfg.nodes
    ]
