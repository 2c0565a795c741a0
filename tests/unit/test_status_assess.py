"""apull status's judgement of node reports, its rollup, table and JSON document; and a node
that does not answer (a real connection to a closed port)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from apull.bundle.artefacts import ANY, BuiltBinary, Bundle
from apull.containerd.config_patch import patch_config
from apull.inventory import FabricHost
from apull.status import view
from apull.status.assess import Level, NodeStatus, State, assess
from apull.status.command import read_node

DEBIAN = (Path(__file__).parent / "fixtures/containerd/v2_debian_bookworm.toml").read_text()
SNAP_SHA, APULLD_SHA = "5" * 64, "a" * 64


def _bundle() -> Bundle:
    return Bundle(Path("/b"), "0.1", "f" * 64, (
        BuiltBinary("apull-containerd-grpc", "/usr/bin/apull-containerd-grpc", "0550",
                    "apull-snapshotter.service", SNAP_SHA, 1, platform="x86_64-cp311"),
        BuiltBinary("apulld", "/usr/bin/apulld", "0550", "apulld.service", APULLD_SHA, 1,
                    platform=ANY),
    ))  # fmt: skip


def _patched() -> str:
    return patch_config(DEBIAN, set_default_snapshotter=True,
                        registry_hosts=["registry.lab:5000"]).text  # fmt: skip


def _healthy() -> dict[str, Any]:
    text = _patched()
    sha = hashlib.sha256(text.encode()).hexdigest()
    service = {"active": "active", "sub": "running", "since": 1.0e9, "restarts": 0, "pid": 9}
    return {
        "probe": 1,
        "host": {"arch": "x86_64", "glibc": "2.36", "python": "3.11", "kernel": "6.1.0-50-amd64",
                 "os": "Debian GNU/Linux 12 (bookworm)", "hostname": "node1"},
        "fs_ctl": None,
        "settings": {"source": "/etc/apull/config.toml",
                     "snapshotter_address": "/run/containerd-apull-grpc.sock"},
        "binaries": {"/usr/bin/apull-containerd-grpc": SNAP_SHA, "/usr/bin/apulld": APULLD_SHA},
        "services": {u: dict(service) for u in
                     ("apulld.service", "apull-snapshotter.service", "containerd.service")},
        "apulld": {"answer": {"backend": "fscache", "reasons": ["fscache: bound"],
                              "version": "0.1"}},
        "plugin": {"status": "ok", "error": ""},
        "containerd_config": {
            "path": "/etc/containerd/config.toml", "text": text, "sha256": sha,
            "record": {"version": 1, "sha256": sha, "set_default_snapshotter": True,
                       "insecure_registries": ["registry.lab:5000"], "overrides": {},
                       "proxy_address": "/run/containerd-apull-grpc.sock",
                       "snapshotter_name": "apull"},
        },
        "cache": {"dir": "/c", "bytes": 3 << 20, "limit_bytes": 10 << 30},
        "images": [{"image": "registry.lab:5000/test/lazy:v1", "layers": 2, "bytes": 400,
                    "fetched": 100}],
        "errors": [],
    }  # fmt: skip


def _judge(report: dict[str, Any] | None, name: str = "node1") -> NodeStatus:
    return assess(NodeStatus(name, f"root@{name}:22", report=report), _bundle())


def test_a_healthy_node_is_ready_with_nothing_found() -> None:
    status = _judge(_healthy())
    assert status.state is State.READY
    assert status.findings == []
    assert [b.current for b in status.binaries] == [True, True]
    assert status.config is not None and status.config.patched and not status.config.edited


def test_another_build_of_a_binary_is_drift() -> None:
    report = _healthy()
    report["binaries"]["/usr/bin/apulld"] = "0" * 64
    status = _judge(report)
    assert status.state is State.DRIFTED
    assert [(f.level, f.what) for f in status.findings] == [(Level.DRIFT, "binary")]
    assert "apulld is another build (000000000000; this checkout's is aaaaaaaaaaaa)" in (
        status.findings[0].text
    )


def test_a_config_edited_back_by_hand_is_drift_naming_the_keys() -> None:
    report = _healthy()
    report["containerd_config"]["text"] = DEBIAN
    report["containerd_config"]["sha256"] = hashlib.sha256(DEBIAN.encode()).hexdigest()
    status = _judge(report)
    assert status.state is State.DRIFTED
    assert status.config is not None
    assert not status.config.patched and status.config.edited
    assert "proxy_plugins.apull.type" in status.config.drifted_keys
    assert any("snapshotter" in key for key in status.config.drifted_keys)


def test_an_edit_that_keeps_apulls_keys_is_a_warning_only() -> None:
    report = _healthy()
    text = report["containerd_config"]["text"] + "\n# a comment by hand\n"
    report["containerd_config"].update(text=text, sha256=hashlib.sha256(text.encode()).hexdigest())
    status = _judge(report)
    assert status.state is State.READY
    assert [(f.level, f.what) for f in status.findings] == [(Level.WARN, "containerd")]


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (lambda r: r["services"]["apulld.service"].update(active="failed"), "service"),
        (lambda r: r.update(apulld={"error": "/run/apulld.sock: Connection refused"}), "apulld"),
        (lambda r: r["plugin"].update(status="error"), "containerd"),
        (lambda r: r["binaries"].update({"/usr/bin/apulld": None}), "binary"),
        (lambda r: r["containerd_config"].update(text=None), "containerd"),
        (lambda r: r["host"].update(python="3.8"), "binary"),
    ],
)  # fmt: skip
def test_what_stops_the_stack_is_failing(change: Any, what: str) -> None:
    report = _healthy()
    change(report)
    status = _judge(report)
    assert status.state is State.FAILING
    assert (Level.FAIL, what) in [(f.level, f.what) for f in status.findings]


def test_warnings_do_not_change_the_state() -> None:
    report = _healthy()
    report["errors"] = ["2026-12-07T10:00:00 node1 apulld[9]: registry.lab:5000: 503"]
    report["fs_ctl"] = {"erofs_enabled": "1", "cachefiles_ondemand_enabled": "0"}
    status = _judge(report)
    assert status.state is State.READY
    assert sorted(f.what for f in status.findings) == ["errors", "kernel"]


def test_a_closed_port_is_unreachable_and_named() -> None:
    host = FabricHost("gone", "127.0.0.1", 1, "root", {})
    status = assess(read_node(host, "true", check_known_hosts=False), _bundle())
    assert status.state is State.UNREACHABLE
    assert status.report is None and status.error


def test_the_json_document_and_the_rollup() -> None:
    ready = _judge(_healthy(), "node1")
    drifted_report = _healthy()
    drifted_report["binaries"]["/usr/bin/apulld"] = "0" * 64
    drifted = _judge(drifted_report, "node2")
    gone = NodeStatus("node3", "root@node3:22", error="NoValidConnectionsError: refused")
    document = view.document([ready, drifted, gone], _bundle(), 1.25)
    assert json.loads(json.dumps(document)) == document
    assert document["schema"] == view.SCHEMA_VERSION
    assert document["summary"] == {"nodes": 3, "ready": 1, "drifted": 1, "failing": 0,
                                   "unreachable": 1, "seconds": 1.25}  # fmt: skip
    first = document["nodes"][0]
    assert first["images"] == [{"image": "registry.lab:5000/test/lazy:v1", "layers": 2,
                                "bytes": 400, "fetched": 100, "fraction": 0.25}]  # fmt: skip
    assert first["containerd_config"] == {"patched": True, "edited": False, "recorded": True,
                                          "drifted_keys": []}  # fmt: skip
    assert document["nodes"][1]["state"] == "drifted"
    assert document["nodes"][2]["state"] == "unreachable"
    assert document["nodes"][2]["error"] == "NoValidConnectionsError: refused"
    # The config's text is never in the document (it may hold registry credentials).
    assert "proxy_plugins" not in json.dumps(document)


def test_the_table_the_images_and_the_findings() -> None:
    report = _healthy()
    broken = copy.deepcopy(report)
    broken["plugin"]["status"] = "error"
    statuses = [_judge(report, "node1"), _judge(broken, "node2")]
    console = Console(width=250, record=True, color_system=None)
    console.print(view.fleet_table(statuses, _bundle()))
    images = view.images_table(statuses)
    assert images is not None
    console.print(images)
    for line in view.findings_lines(statuses):
        console.print(line)
    console.print(view.rollup_line(statuses, 0.5))
    text = console.export_text()
    assert "│ node1 │ ready " in text and "│ node2 │ failing " in text
    assert "25% (100 B)" in text
    assert "node2: fail: containerd: containerd's apull plugin: error" in text
    assert text.rstrip().endswith("2 node(s): 1 ready, 0 drifted, 1 failing, 0 unreachable (0.5 s)")


def test_a_config_never_patched_says_so() -> None:
    report = _healthy()
    report["containerd_config"].update(text=DEBIAN, record=None)
    status = _judge(report)
    assert status.state is State.DRIFTED
    assert status.findings[0].text.startswith(
        "/etc/containerd/config.toml is not patched for apull: "
    )


def test_bracketed_text_is_shown_as_it_is() -> None:
    """Error texts ("[Errno 111]") and IPv6 addresses are not taken for rich markup."""
    gone = NodeStatus("node9", "root@[fe80::1]:22", error="OSError: [Errno 111] refused")
    report = _healthy()
    report["errors"] = ["apulld[9]: [registry.lab:5000] 503"]
    console = Console(width=200, record=True, color_system=None)
    for line in view.findings_lines([gone, _judge(report, "node1")]):
        console.print(line)
    text = console.export_text()
    assert "node9: unreachable: OSError: [Errno 111] refused" in text
    assert "node1:   apulld[9]: [registry.lab:5000] 503" in text
