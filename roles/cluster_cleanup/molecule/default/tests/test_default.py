"""cluster_cleanup removed the earlier install's release and pods from the lab's cluster."""

import testinfra
from testinfra.host import Host

testinfra_hosts = ["ansible://molecule_nodes"]


def _controller_kubeconfig(host: Host) -> str:
    kubeconfig: str = host.ansible.get_variables()["apull_kubeconfig_path"]
    return kubeconfig


def test_release_and_pods_are_gone(host: Host) -> None:
    local = testinfra.get_host("local://")
    kubeconfig = _controller_kubeconfig(host)
    releases = local.check_output(f"helm --kubeconfig {kubeconfig} list -n apull-install -q")
    assert "apull-snapshotter" not in releases.split()
    kubectl = f"kubectl --kubeconfig {kubeconfig}"
    pods = local.check_output(f"{kubectl} get pods -n apull-install -o name")
    assert pods.strip() == ""


def test_namespace_is_left(host: Host) -> None:
    local = testinfra.get_host("local://")
    kubeconfig = _controller_kubeconfig(host)
    kubectl = f"kubectl --kubeconfig {kubeconfig}"
    out = local.check_output(f"{kubectl} get namespace apull-install -o name")
    assert out.strip() == "namespace/apull-install"
