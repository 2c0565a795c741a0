"""The DaemonSet test's own logic: Go durations, kubelet's Pulled events, the manifest.
The test itself runs against the lab's real cluster (tests/integration/test_kube_cluster.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apull import cli
from apull.kube.daemonset_timing import (
    CONTROL_PLANE_TAINTS,
    manifest,
    parse_go_duration,
    pull_result,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5s", 1.5),
        ("850.25ms", 0.85025),
        ("2m3.5s", 123.5),
        ("1h0m0.001s", 3600.001),
        ("12µs", 12e-6),
        ("0", 0.0),
    ],
)
def test_go_durations_as_kubelet_prints_them(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1.5", "s", "1.5 s", "1.5sx", "-1s", "abc"])
def test_what_is_not_a_go_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a Go duration"):
        parse_go_duration(text)


def _event(pod: str, reason: str, message: str, kind: str = "Pod") -> dict[str, object]:
    return {"involvedObject": {"kind": kind, "name": pod}, "reason": reason, "message": message}


def test_pull_time_is_the_pods_own_pulled_event() -> None:
    events = [
        _event("ds-a", "Pulling", 'Pulling image "r/x:1"'),
        _event("ds-b", "Pulled", 'Successfully pulled image "r/x:1" in 9.5s'),
        _event("ds-a", "Pulled", 'Successfully pulled image "r/x:1" in 1m2.25s'),
        _event("ds-a", "Pulled", 'Successfully pulled image "r/x:1" in 3s', kind="Node"),
    ]
    assert pull_result(events, "ds-a") == (62.25, "pulled")
    assert pull_result(events, "ds-b") == (9.5, "pulled")


def test_newer_kubelets_pull_messages_are_read_too() -> None:
    message = (
        'Successfully pulled image "r/x:1" in 717ms (718ms including waiting). '
        "Image size: 2048 bytes."
    )
    assert pull_result([_event("ds-a", "Pulled", message)], "ds-a") == (0.717, "pulled")


def test_an_image_already_on_the_node_has_no_pull_time() -> None:
    events = [_event("ds-a", "Pulled", 'Container image "r/x:1" already present on machine')]
    assert pull_result(events, "ds-a") == (None, "already present")


def test_no_pulled_event_yet_is_none() -> None:
    assert pull_result([_event("ds-a", "Scheduled", "assigned")], "ds-a") is None
    assert pull_result([], "ds-a") is None


def test_the_daemonset_runs_on_the_named_nodes_and_tolerates_the_control_plane() -> None:
    doc = manifest("t", "ns", "r/x:1", ["node2", "node1"], None)
    spec = doc["spec"]["template"]["spec"]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    # The apiserver takes one value per field selector: one term per node, ORed.
    fields = [t["matchFields"] for t in term["nodeSelectorTerms"]]
    assert fields == [
        [{"key": "metadata.name", "operator": "In", "values": ["node1"]}],
        [{"key": "metadata.name", "operator": "In", "values": ["node2"]}],
    ]
    assert {t["key"] for t in spec["tolerations"]} == set(CONTROL_PLANE_TAINTS)
    (container,) = spec["containers"]
    assert container["image"] == "r/x:1"
    assert "command" not in container
    assert (
        doc["spec"]["selector"]["matchLabels"].items()
        <= doc["spec"]["template"]["metadata"]["labels"].items()
    )


def test_a_command_runs_with_sh() -> None:
    doc = manifest("t", "ns", "r/x:1", ["node1"], "/start && sleep 9")
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "-c", "/start && sleep 9"]


def _config(tmp_path: Path, kubeconfig: str) -> Path:
    path = tmp_path / "config.txt"
    path.write_text(f"SSH_USER=root\nKUBECONFIG_PATH={kubeconfig}\n")
    path.chmod(0o600)
    return path


def test_the_command_needs_a_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APULL_LAB_CACHE", str(tmp_path / "cache"))
    config = _config(tmp_path, "")
    assert cli.main(["--config", str(config), "k8s-test", "r/x:1"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: KUBECONFIG_PATH is empty" in err


def test_an_unreachable_cluster_fails_naming_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """kubectl for real, against a port where nothing listens."""
    monkeypatch.setenv("APULL_LAB_CACHE", str(tmp_path / "cache"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    config = _config(tmp_path, str(kubeconfig))
    assert cli.main(["--config", str(config), "k8s-test", "r/x:1"]) == 1
    err = capsys.readouterr().err
    assert "k8s-test failed: kubectl get nodes -o json:" in err
    assert "127.0.0.1:1" in err
