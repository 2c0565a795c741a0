"""Rolling kernel upgrades stop at the first failure: with serial 1 and three nodes needing an
upgrade, a node made to fail its install stops the rollout; the node before it is upgraded,
the failing node is still reachable on its old kernel and was not rebooted, and the node after
it was never touched.

Kubernetes: the run gets a kubeconfig pointing at a FAKE API server (no Kubernetes can run
here) and real kubectl drains each node before its upgrade and uncordons it after; the
recorded requests show which nodes were drained, evicted and uncordoned."""

from __future__ import annotations

from conftest import (
    apull,
    boot_id,
    package_installed,
    recap,
    reset_nodes,
    restore_configured_state,
    run_on,
)

from apull.lab import layout
from apull.testing.fake_kube_api import FakeKubeAPI

FAIL_HOOK = "/etc/apt/apt.conf.d/99apull-test-fail"


def _workload(node: str) -> dict:
    return {
        "metadata": {
            "name": f"web-{node}",
            "namespace": "default",
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs-1",
                 "controller": True}
            ],
        }
    }  # fmt: skip


def _patches(api: FakeKubeAPI, node: str) -> list[object]:
    return [
        (r.body or {}).get("spec", {}).get("unschedulable")
        for r in api.requests
        if r.method == "PATCH" and r.path.split("?")[0] == f"/api/v1/nodes/{node}"
    ]


def test_a_failing_node_stops_the_rollout(lab, tmp_path):
    assert len(lab) >= 3, "needs three lab nodes"
    first, failing, untouched = lab[:3]
    stock = [layout.LabNode(n.index, "stock") for n in (first, failing, untouched)]
    try:
        reset_nodes(stock)
        # A real failure inside the package manager, not a mocked one.
        hook = f"echo 'DPkg::Pre-Invoke {{\"/bin/false\";}};' > {FAIL_HOOK}"
        assert run_on(failing, hook).returncode == 0
        before = {n.name: boot_id(n) for n in (first, failing, untouched)}
        kernel_before = run_on(failing, "uname -r").stdout.strip()

        names = [first.name, failing.name, untouched.name]
        with FakeKubeAPI(names, pods={n: [_workload(n)] for n in names}) as api:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            result = apull("run", "kernel", "--no-lab", "-e", f"kernel_kubeconfig={kubeconfig}")
        out = result.stdout
        assert result.returncode != 0, out[-3000:]

        hosts = recap(out)
        assert hosts[first.name][3] == 0 and hosts[first.name][1] > 0, out[-4000:]
        assert hosts[failing.name][3] == 1, out[-4000:]
        assert untouched.name not in hosts
        assert f"[{untouched.name}]" not in out

        assert boot_id(first) != before[first.name]
        assert package_installed(first)

        assert boot_id(failing) == before[failing.name], "the failing node was rebooted"
        assert run_on(failing, "uname -r").stdout.strip() == kernel_before
        assert not package_installed(failing)
        assert "installing apull-ondemand-modules" in out
        assert "The node still runs its old kernel and was not rebooted." in out
        listed = run_on(failing, "ls /etc/apt/sources.list.d/").stdout.split()
        assert "apull-kernel.list" not in listed

        assert boot_id(untouched) == before[untouched.name]
        assert not package_installed(untouched)

        # Drained then uncordoned after its verified reboot; drained and left cordoned; never
        # touched.
        assert _patches(api, first.name) == [True, None]
        assert _patches(api, failing.name) == [True]
        assert _patches(api, untouched.name) == []
        evicted = {r.path.split("/")[6] for r in api.requests if r.path.endswith("/eviction")}
        assert evicted == {f"web-{first.name}", f"web-{failing.name}"}
    finally:
        run_on(failing, f"rm -f {FAIL_HOOK}")
        restore_configured_state(lab)
