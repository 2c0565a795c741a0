"""The chart's connection (apull.deploy.host_namespaces), run by real ansible-playbook.

The "host" is a process in mount and UTS namespaces of its own (unshare): a tmpfs and a
host name exist only there. The play's commands, modules (pipelined), copies and fetches
must see and change that namespace, not the one ansible-playbook runs in."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOSTNAME = "apull-chart-host"

PLAY = """
- name: Tasks on the host through nsenter
  hosts: node
  gather_facts: false
  tasks:
    - name: A command
      ansible.builtin.command: hostname
      register: host_name
    - name: A module, pipelined
      ansible.builtin.stat:
        path: "{dir}/only-on-the-host"
      register: marker
    - name: A copy (put_file)
      ansible.builtin.copy:
        content: "from the controller\\n"
        dest: "{dir}/copied"
        mode: "0640"
    - name: A fetch
      ansible.builtin.fetch:
        src: "{dir}/only-on-the-host"
        dest: "{out}/fetched"
        flat: true
    - name: What it saw
      ansible.builtin.copy:
        content: "{{{{ host_name.stdout }}}} {{{{ marker.stat.exists }}}}"
        dest: "{out}/seen"
        mode: "0600"
      delegate_to: localhost
      vars:
        ansible_connection: local
"""


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A process with a private mount (a tmpfs on `dir`) and UTS (its own host name)."""
    shared = tmp_path / "host"
    shared.mkdir()
    script = (
        f"mount -t tmpfs apull-test {shared} && echo host > {shared}/only-on-the-host && "
        f"hostname {HOSTNAME} && echo $$ && exec sleep 600"
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--uts", "--propagation", "private", "--fork", "sh", "-c", script],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        pytest.fail(f"unshare did not start: {line!r}")
    try:
        yield int(line), shared
    finally:
        proc.kill()
        subprocess.run(["pkill", "-P", str(proc.pid)], check=False)
        proc.wait()


def _play(tmp_path: Path, pid: int, shared: Path) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "out"
    out.mkdir()
    play = tmp_path / "play.yml"
    play.write_text(PLAY.format(dir=shared, out=out))
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        "all:\n  hosts:\n    node:\n"
        "      ansible_connection: apull.deploy.host_namespaces\n"
        f"      apull_host_namespaces_pid: {pid}\n"
        f"      ansible_python_interpreter: {sys.executable}\n"
    )
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-vvv", "-i", str(inventory),
           str(play)]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_tasks_act_in_the_hosts_namespaces(tmp_path: Path, host: tuple[int, Path]) -> None:
    pid, shared = host
    result = _play(tmp_path, pid, shared)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "seen").read_text() == f"{HOSTNAME} True"
    assert (out / "fetched").read_text() == "host\n"
    # The copy landed in the host's tmpfs: not here, but there.
    assert not (shared / "copied").exists()
    there = subprocess.run(
        ["nsenter", "--target", str(pid), "--mount", "--", "stat", "-c", "%a %s",
         str(shared / "copied")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert there.stdout.split() == ["640", str(len("from the controller\n"))], there.stderr
    # Modules are piped (pipelining): the copy's content is the one file sent.
    assert result.stdout.count("HOST NS PUT ") == 1, result.stdout[-3000:]


def test_a_process_it_cannot_enter_fails_the_host_with_the_reason(tmp_path: Path) -> None:
    shared = tmp_path / "host"
    shared.mkdir()
    result = _play(tmp_path, 2**22 + 7, shared)  # above pid_max: no such process
    assert result.returncode != 0
    assert "cannot enter the namespaces of host pid 4194311" in result.stdout
    assert "the container needs hostPID and privileges" in result.stdout
