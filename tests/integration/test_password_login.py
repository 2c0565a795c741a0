"""Password logins through the real inventory, lookup and sshd: they work, and the password
is never printed, not even at -vvvv."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_on

ROOT = Path(__file__).resolve().parents[2]
USER = "apullpw"


@pytest.fixture
def password_user(lab):
    node = lab[0]
    password = "pw-" + secrets.token_hex(12)
    setup = run_on(
        node,
        f"id {USER} >/dev/null 2>&1 || useradd -m -s /bin/sh -G sudo {USER}; "
        f"echo '{USER}:{password}' | chpasswd && "
        f"printf 'Match User {USER}\\n  PasswordAuthentication yes\\n' "
        "> /etc/ssh/sshd_config.d/zz-apull-pwtest.conf && systemctl reload ssh",
    )
    assert setup.returncode == 0, setup.stderr
    yield node, password
    run_on(node, "rm -f /etc/ssh/sshd_config.d/zz-apull-pwtest.conf; systemctl reload ssh; "
                 f"userdel -r {USER} 2>/dev/null; true")  # fmt: skip


def _config(tmp_path: Path, node, password: str, mode: int) -> Path:
    cfg = tmp_path / "config.txt"
    cfg.write_text(
        f"TARGET=servers\nSSH_USER={USER}\nSSH_PASSWORD='{password}'\n"
        f"NODES=127.0.0.1:{node.ssh_port}\n"
    )
    cfg.chmod(mode)
    return cfg


def test_password_login_and_sudo_work_and_the_password_is_never_printed(password_user, tmp_path):
    node, password = password_user
    cfg = _config(tmp_path, node, password, 0o600)
    env = {
        **os.environ,
        "APULL_CONFIG": str(cfg),
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "HOME": str(tmp_path),
    }
    # ssh reads ~/.ssh of the passwd entry, not $HOME: give this run a known_hosts of its own,
    # empty, so accept-new meets an unknown host as on a first deployment.
    known_hosts = f"-o UserKnownHostsFile={tmp_path / 'known_hosts'}"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "apull_nodes", "-vvvv",
         "-e", f"ansible_ssh_extra_args='{known_hosts}'",
         "-m", "ansible.builtin.shell", "-a", 'id -un; echo "by $SUDO_USER"'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # Logged in as USER with the password, then sudo with the same password: root, and
    # sudo names USER as the one who asked.
    assert f"127.0.0.1 | CHANGED | rc=0 >>\nroot\nby {USER}\n" in result.stdout + "\n"
    assert password not in output


def test_world_readable_config_with_password_is_warned(password_user, tmp_path):
    node, password = password_user
    cfg = _config(tmp_path, node, password, 0o644)
    result = subprocess.run(
        [sys.executable, "-m", "apull.cli", "--config", str(cfg), "config", "check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    assert "SSH_PASSWORD is set and the file is readable by other users (mode 0644)" in (
        result.stderr
    )
    assert f"chmod 600 {cfg}" in result.stderr
    assert password not in result.stdout + result.stderr
