"""The node_labels role labelled the nodes in the lab's real cluster, and left other labels."""

import json
from typing import Any

import testinfra
from testinfra.host import Host

testinfra_hosts = ["ansible://molecule_nodes"]


def _labels(host: Host) -> dict[str, Any]:
    kubeconfig = host.ansible.get_variables()["apull_kubeconfig_path"]
    local = testinfra.get_host("local://")
    name = host.ansible.get_variables()["inventory_hostname"]
    out = local.check_output(
        f"kubectl --kubeconfig {kubeconfig} get node {name} -o jsonpath='{{.metadata.labels}}'"
    )
    labels: dict[str, Any] = json.loads(out)
    return labels


def test_ready_and_backend_labels(host: Host) -> None:
    labels = _labels(host)
    assert labels["apull.io/ready"] == "true"
    assert labels["apull.io/backend"] == "fscache"


def test_other_labels_are_left_alone(host: Host) -> None:
    labels = _labels(host)
    assert labels["example.com/team"] == "storage"
    assert labels["kubernetes.io/hostname"] == host.ansible.get_variables()["inventory_hostname"]
