"""The end-of-run status table and JSON report (apull.deploy.summary), run by real
ansible-playbook: one node over a local connection with the facts node_facts gives, one
node whose ssh port nobody listens on. An unreachable node is named by its inventory name,
with the task and ssh's reason; long texts are shortened in the table at a word boundary
only and kept whole in the JSON; the ONDEMAND column names what decided. The helpers are
tested on their own too: Ansible's message with an empty ssh error, what answers on the
port then, passwords."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "n0t-Shown-3ver"
TAKEN_BACK = "/dev/cachefiles fd (bound on-demand) taken back from the previous apulld"
UPDATES = "/lib/modules/6.1.0-50-amd64/updates"
NOTE = (
    "the kernel config says CONFIG_CACHEFILES_ONDEMAND=n, CONFIG_EROFS_FS_ONDEMAND=n, but "
    f"on-demand support comes from modules rebuilt outside the kernel ({UPDATES}/cachefiles.ko, "
    f"{UPDATES}/erofs.ko): the config describes only the kernel's own modules; on-demand "
    "enabled, decided by: fs_ctl gate"
)
NODE1_FACTS = {
    "kernel": "6.1.0-50-amd64",
    "containerd": "1.6.20",
    "backend": "fscache",
    "backend_source": "apulld",
    "backend_why": f"apulld: {TAKEN_BACK}",
    "backend_reasons": [f"fscache: {TAKEN_BACK}"],
    "ondemand": "enabled",
    "ondemand_source": "fs_ctl gate",
    "ondemand_note": NOTE,
    "kconfig": {"CONFIG_CACHEFILES_ONDEMAND": "n", "CONFIG_EROFS_FS_ONDEMAND": "n"},
    "fs_ctl": {"cachefiles_ondemand_enabled": "Y", "erofs_enabled": "Y"},
    "problems": [],
}
TASK = "Reach the node"
PLAY = f"""
- name: Read the nodes
  hosts: all
  gather_facts: false
  tasks:
    - name: {TASK}
      ansible.builtin.ping:

    - name: Gather apull node facts (as node_facts returns them)
      ansible.builtin.set_fact:
        apull_node: "{{{{ lookup('ansible.builtin.file', '{{out}}/node1.json') | from_json }}}}"
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_summary() -> ModuleType:
    sys.path.insert(0, str(ROOT / "collections"))
    try:
        return importlib.import_module("ansible_collections.apull.deploy.plugins.callback.summary")
    finally:
        sys.path.remove(str(ROOT / "collections"))


summary = load_summary()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], int]:
    """(stdout, report, node2's port) of one run over node1 (local) and node2 (closed port)."""
    out = tmp_path_factory.mktemp("summary")
    port = closed_port()
    (out / "node1.json").write_text(json.dumps(NODE1_FACTS))
    (out / "inventory.yml").write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {
                        "node1": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                        },
                        "node2": {
                            "ansible_host": "127.0.0.1",
                            "ansible_port": port,
                            "ansible_user": "root",
                            "ansible_password": PASSWORD,
                            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
                        },
                    }
                }
            }
        )
    )
    (out / "play.yml").write_text(PLAY.replace("{out}", str(out)))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "APULL_REPORT_DIR": str(out / "reports"),
    }
    playbook = str(Path(sys.executable).parent / "ansible-playbook")
    cmd = [playbook, "-i", str(out / "inventory.yml"), str(out / "play.yml")]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stdout[-3000:] + result.stderr[-2000:]  # unreachable
    report = json.loads((out / "reports" / "play-last.json").read_text())
    return result.stdout, report, port


def table_line(stdout: str, host: str) -> str:
    status = stdout.split("APULL NODE STATUS", 1)[1]
    [line] = [line for line in status.splitlines() if line.startswith(host + " ")]
    return line


# -- 1. an unreachable node ----------------------------------------------------------------------


def test_an_unreachable_node_is_named_with_its_task_and_reason(run) -> None:
    stdout, report, port = run
    reason = f"ssh: connect to host 127.0.0.1 port {port}: Connection refused"
    outcome = f"UNREACHABLE at: {TASK}: {reason}"
    [row] = [r for r in report["rows"] if r["host"] == "node2"]
    assert row["outcome"] == outcome  # (it was "FAILED at: unreachable")
    assert row["problems"] == "unknown (unreachable)"
    assert report["unreachable"] == {
        "node2": {"task": TASK, "reason": reason, "address": f"127.0.0.1:{port}"}
    }
    assert {r["host"] for r in report["rows"]} == {"node1", "node2"}  # never by its address
    assert table_line(stdout, "node2").endswith(outcome)
    assert PASSWORD not in stdout and PASSWORD not in json.dumps(report)


def test_ansibles_message_without_sshs_text_gets_the_reason_from_the_port() -> None:
    port = closed_port()
    # What ansible's ssh connection raises when ssh wrote nothing on stderr.
    message = (
        'Task failed: Data could not be sent to remote host "127.0.0.1". Make sure this host '
        "can be reached over ssh: "
    )
    reason = summary.unreachable_reason(message, "node2", "127.0.0.1", str(port))
    assert reason == f"ssh gave no error text; Connection refused (127.0.0.1:{port})"
    assert summary.unreachable_reason(message, "node2") == "ssh gave no error text"


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, list[bytes]]]:
    """A TCP port that accepts, sends what the test puts in the list, and closes."""
    server = socket.create_server(("127.0.0.1", 0))
    sent: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                if sent:
                    conn.sendall(sent[0])

    threading.Thread(target=serve, daemon=True).start()
    yield server, sent
    server.close()


def test_what_answers_on_the_port_is_said(listener) -> None:
    server, sent = listener
    port = server.getsockname()[1]
    message = "Failed to connect to the host via ssh: "
    reason = summary.unreachable_reason(message, "node2", "127.0.0.1", str(port))
    assert reason == (
        f"ssh gave no error text; 127.0.0.1:{port} accepts connections but closes them without "
        "an SSH banner (sshd not running yet?)"
    )
    sent.append(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    reason = summary.unreachable_reason(message, "node2", "127.0.0.1", str(port))
    assert reason == (
        f"ssh gave no error text; sshd answers on 127.0.0.1:{port} "
        "(SSH-2.0-OpenSSH_9.2p1 Debian-2), yet ssh failed without an error text"
    )


def test_sshs_text_is_kept_without_its_noise_and_secrets() -> None:
    message = (
        "Task failed: Failed to connect to the host via ssh: Warning: Permanently added "
        "'[127.0.0.1]:2202' (ED25519) to the list of known hosts.\r\n"
        f"root@127.0.0.1: Permission denied (publickey,password). sshpass password={PASSWORD}\n"
        f"debug1: tried {PASSWORD}\n"
    )
    reason = summary.unreachable_reason(message, "node2", "127.0.0.1", "2202", [PASSWORD])
    assert reason == (
        "root@127.0.0.1: Permission denied (publickey,password). sshpass password=********; "
        "debug1: tried ********"
    )
    # A message Ansible words otherwise names the host by its inventory name.
    other = 'Timeout (12s) waiting for privilege escalation prompt on remote host "10.0.0.7"'
    assert summary.unreachable_reason(other, "node7", "10.0.0.7", "22") == (
        "Timeout (12s) waiting for privilege escalation prompt on node7 (10.0.0.7:22)"
    )


def test_only_passwords_written_out_are_taken_as_secrets() -> None:
    secrets = summary.host_secrets(
        {"ansible_password": PASSWORD, "ansible_become_password": "{{ vault_pw }}"}
    )
    assert secrets == [PASSWORD]


def test_the_password_config_txt_holds_is_not_shown(tmp_path: Path) -> None:
    """The inventory refers to config.txt's SSH_PASSWORD through the config_secret lookup: the
    callback resolves it (in Ansible's process, with its plugin loader) to hide it."""
    config = tmp_path / "config.txt"
    config.write_text(f"TARGET=servers\nNODES=10.0.0.7\nSSH_USER=root\nSSH_PASSWORD={PASSWORD}\n")
    config.chmod(0o600)
    script = f"""
from ansible.plugins.loader import init_plugin_loader
init_plugin_loader([{str(ROOT / "collections")!r}])
from ansible_collections.apull.deploy.plugins.callback import summary
from apull.inventory import PASSWORD_LOOKUP
secrets = summary.host_secrets({{"ansible_password": PASSWORD_LOOKUP}})
print(summary.unreachable_reason(
    "Failed to connect to the host via ssh: sshpass: {PASSWORD} refused", "node7", "10.0.0.7",
    "22", secrets))
"""
    env = {**os.environ, "APULL_CONFIG": str(config)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "sshpass: ******** refused"


# -- 2. long texts ---------------------------------------------------------------------------------


def test_the_table_shortens_at_a_word_boundary_and_the_report_keeps_all(run) -> None:
    stdout, report, _ = run
    [row] = [r for r in report["rows"] if r["host"] == "node1"]
    assert row["backend"] == f"fscache (apulld: {TAKEN_BACK})"
    assert report["nodes"]["node1"]["backend_why"] == f"apulld: {TAKEN_BACK}"
    line = table_line(stdout, "node1")
    assert "fscache (apulld: /dev/cachefiles fd (bound on-demand) taken back\u2026)" in line
    assert "apul " not in line and "previous" not in line


@pytest.mark.parametrize(
    ("width", "shown"),
    [
        (200, f"apulld: {TAKEN_BACK}"),
        (70, "apulld: /dev/cachefiles fd (bound on-demand) taken back from the\u2026"),
        (42, "apulld: /dev/cachefiles fd (bound\u2026"),
        (5, "apulld:\u2026"),  # a first word longer than the width stays whole
    ],
)
def test_shorten_never_cuts_a_word(width: int, shown: str) -> None:
    text = f"apulld: {TAKEN_BACK}"
    assert summary.shorten(text, width) == shown
    words = text.split()
    kept = shown.rstrip("\u2026").split()
    assert kept == words[: len(kept)]
    assert len(shown) <= max(width, len(words[0]) + 1)


# -- 3. what decided the on-demand state -----------------------------------------------------------


def test_the_ondemand_column_names_the_source_and_the_note_explains_the_config(run) -> None:
    stdout, report, _ = run
    [row] = [r for r in report["rows"] if r["host"] == "node1"]
    assert row["ondemand"] == "enabled (fs_ctl gate)"
    assert row["ondemand_note"] == NOTE
    assert report["nodes"]["node1"]["ondemand_source"] == "fs_ctl gate"
    assert re.search(r"\senabled \(fs_ctl gate\)\s", table_line(stdout, "node1"))
    assert f"note: node1: {NOTE}" in stdout.splitlines()


@pytest.mark.parametrize(
    ("node", "shown"),
    [
        ({"ondemand": "supported", "ondemand_source": "bind probe"}, "supported (bind probe)"),
        ({"ondemand": "in use by apulld", "ondemand_source": "apulld"}, "in use by apulld"),
        (
            {"ondemand": "supported (modules)",
             "ondemand_source": f"modules (rebuilt outside the kernel: {UPDATES}/cachefiles.ko)"},
            "supported (modules)",
        ),
        ({"ondemand": "unsupported"}, "unsupported"),  # facts of an older node_facts
    ],
)  # fmt: skip
def test_ondemand_text(node: dict[str, str], shown: str) -> None:
    assert summary.ondemand_text(node) == shown


@pytest.mark.parametrize(
    ("entry", "row"),
    [
        ({"host": "n1", "image": "r/a:apull", "state": "warm", "pulled": True, "lazy": True,
          "bytes": 1000, "cached": 1000, "startup_bytes": 200, "startup_cached": 200,
          "fetched": 5 << 20, "seconds": 3.25, "error": ""},
         {"host": "n1", "image": "r/a:apull", "state": "warm (pulled)", "cached": "100%",
          "startup": "100%", "fetched": summary.size_text(5 << 20), "time": "3.2s",
          "reason": ""}),
        ({"host": "n3", "image": "r/a:apull", "state": "failed", "pulled": False,
          "error": "pull: registry.lab:5000 unreachable", "seconds": 1},
         {"host": "n3", "image": "r/a:apull", "state": "failed", "cached": "-", "startup": "-",
          "fetched": "0", "time": "1.0s", "reason": "pull: registry.lab:5000 unreachable"}),
        ({"host": "n2", "image": "busybox", "state": "warm", "lazy": False, "bytes": 0},
         {"host": "n2", "image": "busybox", "state": "warm (not converted)", "cached": "-",
          "startup": "-", "fetched": "0", "time": "0.0s", "reason": ""}),
    ],
)  # fmt: skip
def test_a_prewarm_row_per_node_and_image(entry: dict[str, Any], row: dict[str, str]) -> None:
    assert summary.prewarm_row(entry) == row
