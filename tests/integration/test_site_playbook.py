"""`make all`'s playbook runs for real against the lab's nodes, and a re-run changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def run_site(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apull.cli", "run", "site", "--no-lab", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def recap(output: str) -> dict[str, tuple[int, int, int, int]]:
    return {m[1]: (int(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in RECAP.finditer(output)}


def test_site_runs_on_every_node_then_changes_nothing(lab):
    first = run_site()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    second = run_site()
    assert second.returncode == 0, second.stdout[-3000:]
    hosts = recap(second.stdout)
    assert sorted(hosts) == sorted(n.name for n in lab)
    for host, (ok, changed, unreachable, failed) in hosts.items():
        assert ok > 0, host
        assert (changed, unreachable, failed) == (0, 0, 0), host
    assert "APULL NODE STATUS" in second.stdout
    for node in lab:
        assert re.search(rf"^{node.name}\s+6\.1\.\S+\s.*no change$", second.stdout, re.M)


def test_site_report_describes_each_node(lab, hosts):
    result = run_site()
    assert result.returncode == 0
    report = json.loads((ROOT / ".apull/reports/site-last.json").read_text())
    for node in lab:
        facts = report["nodes"][node.name]
        assert facts["kernel"] == hosts[node.name].sysctl("kernel.osrelease")
        assert facts["containerd"].startswith("1.6.")
        if node.variant == "ondemand":
            assert facts["fs_ctl"] is not None
            assert facts["ondemand"] in {"enabled", "gated (fs_ctl N)"}
        else:
            assert facts["fs_ctl"] is None
            assert facts["ondemand"] == "unsupported"


def test_bad_config_stops_before_any_node_is_touched(tmp_path):
    bad = tmp_path / "config.txt"
    bad.write_text("TARGET=lab\nSSH_USR=root\n")
    result = subprocess.run(
        [sys.executable, "-m", "apull.cli", "--config", str(bad), "run", "site", "--no-lab"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert f"{bad}:2: SSH_USR: unknown key 'SSH_USR' (did you mean SSH_USER?)" in result.stderr
    assert "PLAY" not in result.stdout
