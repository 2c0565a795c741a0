"""Where a run's time goes (apull.deploy.timing), from a real ansible-playbook run over a
local connection: each task's wall time, slowest first, per role and per play, in the
printed summary and in the JSON record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAY = """
- name: Quick play
  hosts: all
  gather_facts: false
  tasks:
    - name: Answer at once
      ansible.builtin.ping:

- name: Slow play
  hosts: all
  gather_facts: false
  roles:
    - role: sleeper
"""
ROLE_TASKS = """
- name: Sleep a while
  ansible.builtin.command: sleep 1.5
  changed_when: false

- name: Skip this one
  ansible.builtin.command: "false"
  when: false
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("timing")
    (out / "roles" / "sleeper" / "tasks").mkdir(parents=True)
    (out / "roles" / "sleeper" / "tasks" / "main.yml").write_text(ROLE_TASKS)
    (out / "timed.yml").write_text(PLAY)
    (out / "inventory.yml").write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {
                        "here": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                        }
                    }
                }
            }
        )
    )
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(out / "roles"),
        "ANSIBLE_CALLBACKS_ENABLED": "apull.deploy.timing",
        "APULL_REPORT_DIR": str(out / "reports"),
    }
    playbook = str(Path(sys.executable).parent / "ansible-playbook")
    cmd = [playbook, "-i", str(out / "inventory.yml"), str(out / "timed.yml")]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    record = json.loads((out / "reports" / "timed-timing.json").read_text())
    return result.stdout, record


def test_each_task_has_its_wall_time_and_each_hosts(run: tuple[str, dict[str, Any]]) -> None:
    _, record = run
    tasks = {t["task"]: t for t in record["tasks"]}
    slow = tasks["Sleep a while"]
    assert slow["role"] == "sleeper"
    assert slow["play"] == "Slow play"
    assert slow["action"] == "ansible.builtin.command"
    assert 1.5 <= slow["wall_seconds"] < 30
    assert set(slow["hosts"]) == {"here"}
    assert tasks["Answer at once"]["wall_seconds"] < slow["wall_seconds"]
    # a skipped task is timed too (the host answered "skipped")
    assert tasks["Skip this one"]["hosts"]["here"] < 1.5
    assert record["playbook"] == "timed"
    assert record["total_seconds"] >= slow["wall_seconds"]


def test_roles_and_plays_sum_their_tasks(run: tuple[str, dict[str, Any]]) -> None:
    _, record = run
    by_task = {t["task"]: t["wall_seconds"] for t in record["tasks"]}
    sleeper = by_task["Sleep a while"] + by_task["Skip this one"]
    assert record["roles"]["sleeper"] == pytest.approx(sleeper, abs=0.01)
    assert record["plays"]["Slow play"] == pytest.approx(sleeper, abs=0.01)
    assert record["roles"]["(no role)"] == pytest.approx(by_task["Answer at once"], abs=0.01)


def test_the_summary_lists_the_slowest_task_first(run: tuple[str, dict[str, Any]]) -> None:
    stdout, _ = run
    summary = stdout.split("TIMING (timed: ", 1)[1].splitlines()
    assert summary[0].endswith(" s, 3 tasks)")
    assert summary[1].strip().endswith("s  sleeper : Sleep a while")
    roles = summary[summary.index("by role:") + 1]
    assert roles.split()[2] == "sleeper"
