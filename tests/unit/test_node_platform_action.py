"""The preflight's platform check (apull.deploy.node_platform) run by real ansible-playbook
over a local connection: this host's platform is read and accepted; a faked `uname -m`
(ppc64le) or glibc (2.12) is refused with the message naming both sides."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PLAY = """
- name: The platform check alone
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Check a build serves this node
      apull.deploy.node_platform:
    - name: Show the facts
      ansible.builtin.copy:
        content: "{{ apull_platform | to_json }}"
        dest: "{out}/facts.json"
        mode: "0600"
"""


def run_play(tmp_path: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    play = tmp_path / "play.yml"
    play.write_text(PLAY.replace("{out}", str(tmp_path)))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "APULL_CONFIG": str(ROOT / "config.txt"),
        "APULL_REPORT_DIR": str(tmp_path / "reports"),
    }
    if path:
        env["PATH"] = f"{path}:{env['PATH']}"
    inventory = str(ROOT / "inventory/apull_inventory.py")
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", inventory, str(play)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_this_host_is_read_and_accepted(tmp_path: Path) -> None:
    result = run_play(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["arch"] == platform.machine()
    assert facts["glibc"] == os.confstr("CS_GNU_LIBC_VERSION").split()[1]
    assert facts["supported"] is True and facts["why"] == ""
    assert facts["text"].startswith(f"{platform.machine()}, glibc ")
    # The run's status table has the platform column.
    report = json.loads((tmp_path / "reports" / "play-last.json").read_text())
    assert report["rows"][0]["platform"] == facts["text"]


@pytest.mark.parametrize(
    ("command", "script", "has"),
    [
        ("uname", "echo ppc64le", "it has ppc64le, glibc "),
        ("getconf", "echo 'glibc 2.12'", ", glibc 2.12, python3 "),
    ],
)
def test_a_node_no_build_serves_is_refused(
    tmp_path: Path, command: str, script: str, has: str
) -> None:
    fakes = tmp_path / "fake-bin"
    fakes.mkdir()
    (fakes / command).write_text(f"#!/bin/sh\n{script}\n")
    (fakes / command).chmod(0o755)
    result = run_play(tmp_path, str(fakes))
    assert result.returncode == 2, result.stdout[-3000:]
    assert "no apull build runs on this node: it has " in result.stdout
    assert has in result.stdout
    assert "supported: x86_64 or aarch64, glibc >= 2.17, python3 3.9-3.13" in result.stdout
    assert not (tmp_path / "facts.json").exists()  # the play stopped at the check
    row = json.loads((tmp_path / "reports" / "play-last.json").read_text())["rows"][0]
    assert row["outcome"].startswith("FAILED at: Check a build serves this node")
    assert row["problems"].startswith("no apull build runs on this node")
