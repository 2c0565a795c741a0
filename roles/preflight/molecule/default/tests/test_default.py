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
    if name == "node1":
        assert facts["backend"] == "fscache"
        assert facts["probe"] == "accepted"
        assert facts["problems"] == []
    else:
        assert facts["backend"] == "none"
        assert facts["probe"] == "rejected: EINVAL"
        [problem] = facts["problems"]
        assert "no usable backend" in problem["what"]
        assert "playbooks/kernel.yml" in problem["fix"]
