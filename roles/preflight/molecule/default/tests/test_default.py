"""preflight read the nodes, told the on-demand node from the stock one, and changed nothing."""

import json
import os
from pathlib import Path

testinfra_hosts = ["ansible://molecule_nodes"]


def report() -> dict:
    path = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "reports" / "converge-last.json"
    return json.loads(path.read_text())


def test_the_probe_left_no_trace(host):
    assert host.run("ls -d /var/tmp/apull-probe-* 2>/dev/null").stdout == ""
    for module in ("cachefiles", "erofs"):
        assert not host.file(f"/sys/module/{module}/sections").exists


def test_report_tells_the_backends_apart(host):
    name = host.backend.get_hostname()
    facts = report()["nodes"][name]
    assert facts["kernel"] == host.sysctl("kernel.osrelease")
    assert facts["registry"]["reachable"] is True
    row = next(r for r in report()["rows"] if r["host"] == name)
    if name == "node1":
        assert facts["backend"] == "fscache"
        assert facts["probe"] == "accepted"
        assert facts["problems"] == []
        # the table's BACKEND column: backend and reason (the running apulld's, if any)
        if facts["backend_source"] == "apulld":
            assert row["backend"].startswith("fscache (apulld: /dev/cachefiles ")
            assert "bound on-demand" in row["backend"]
        else:
            assert row["backend"] == f"fscache (on-demand {facts['ondemand']})"
    else:
        assert facts["backend"] == "none"
        assert facts["backend_source"] == "kernel facts"
        assert facts["probe"] == "rejected: EINVAL"
        assert row["backend"] == "none (no on-demand (rejected: EINVAL), no EROFS file-backed)"
        assert facts["backend_reasons"][-1] == (
            "none: no cache backend available; image data cannot be served"
        )
        [problem] = facts["problems"]
        assert "no usable backend" in problem["what"]
        assert "playbooks/kernel.yml" in problem["fix"]
