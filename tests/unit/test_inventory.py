from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apull.config import ClusterConfig, load_config
from apull.inventory import (
    LAB_SSH_ARGS,
    PASSWORD_LOOKUP,
    SERVERS_SSH_ARGS,
    build_inventory,
    fabric_hosts,
)
from apull.lab import layout

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "inventory" / "apull_inventory.py"
VENV_BIN = REPO / ".venv" / "bin"
#: Distinctive, and full of characters that quoting or templating could mangle.
PASSWORD = "Zq7-pa55 #{{ not_a_var }}'\""
MARKER = "Zq7-pa55"


@pytest.fixture(autouse=True)
def lab_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "lab-cache"
    monkeypatch.setenv("APULL_LAB_CACHE", str(cache))
    return cache


def write_config(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "config.txt"
    path.write_text(text)
    path.chmod(mode)
    return path


def password_line() -> str:
    escaped = PASSWORD.replace("\\", "\\\\").replace('"', '\\"')
    return f'SSH_PASSWORD="{escaped}"\n'


def lab_config(tmp_path: Path, extra: str = "") -> ClusterConfig:
    return load_config(write_config(tmp_path, "SSH_USER=root\nLAB_STOCK_NODES=node2\n" + extra))


def servers_config(tmp_path: Path, extra: str = "") -> ClusterConfig:
    (tmp_path / "id_ed25519").write_text("key")
    (tmp_path / "kubeconfig").write_text("")
    text = (
        "TARGET=servers\nSSH_USER=deploy\nSSH_KEY=id_ed25519\nKUBECONFIG_PATH=kubeconfig\n"
        "REGISTRY=registry.example.com:5000\n"
        "REGISTRY_MIRRORS=docker.io=http://10.0.0.5:5000, http://peer.local:5001\n"
        "PREWARM_IMAGES=registry.example.com:5000/cuda-minimal:apull busybox\n"
        "NODES=a.example.com root@b.example.com:2222\n" + extra
    )
    return load_config(write_config(tmp_path, text))


# --- build_inventory --------------------------------------------------------------------------


def test_lab_inventory(tmp_path: Path, lab_cache: Path) -> None:
    inv = build_inventory(lab_config(tmp_path))
    assert inv["all"]["children"] == ["apull_nodes", "lab"]
    assert inv["all"]["vars"] == {
        "apull_target": "lab",
        "apull_registry": layout.guest_registry(),
        "apull_registry_insecure": True,
        "apull_registry_mirrors": [],
        "apull_prewarm_images": [],
        "apull_kubeconfig_path": "",
    }
    assert inv["apull_nodes"]["hosts"] == ["node1", "node2", "node3"]
    assert inv["lab"]["hosts"] == ["node1", "node2", "node3"]
    # A group per variant, under lab: group_vars per kind of node.
    assert inv["lab"]["children"] == ["lab_ondemand", "lab_stock"]
    assert inv["lab_stock"] == {"hosts": ["node2"]}
    assert inv["lab_ondemand"] == {"hosts": ["node1", "node3"]}
    assert inv["_meta"]["hostvars"]["node2"] == {
        "ansible_host": "127.0.0.1",
        "ansible_port": layout.node_ssh_port(2),
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(lab_cache / "lab_ed25519"),
        "ansible_ssh_common_args": LAB_SSH_ARGS,
        "apull_lab_variant": "stock",
        "apull_lan_addr": layout.node_lan_addr(2),
    }
    assert inv["_meta"]["hostvars"]["node1"]["apull_lab_variant"] == "ondemand"


def test_lab_inventory_with_password_has_no_become_password_for_root(tmp_path: Path) -> None:
    inv = build_inventory(lab_config(tmp_path, password_line()))
    hostvars = inv["_meta"]["hostvars"]["node1"]
    assert hostvars["ansible_password"] == PASSWORD_LOOKUP
    assert "ansible_become_password" not in hostvars


def test_servers_inventory(tmp_path: Path) -> None:
    inv = build_inventory(servers_config(tmp_path, password_line()))
    assert inv["all"]["children"] == ["apull_nodes"]
    assert "lab" not in inv
    assert inv["all"]["vars"] == {
        "apull_target": "servers",
        "apull_registry": "registry.example.com:5000",
        "apull_registry_insecure": False,
        "apull_registry_mirrors": ["docker.io=http://10.0.0.5:5000", "http://peer.local:5001"],
        "apull_prewarm_images": ["registry.example.com:5000/cuda-minimal:apull", "busybox"],
        "apull_kubeconfig_path": str(tmp_path / "kubeconfig"),
    }
    assert inv["apull_nodes"]["hosts"] == ["a.example.com", "b.example.com"]
    a, b = (inv["_meta"]["hostvars"][h] for h in ("a.example.com", "b.example.com"))
    assert a == {
        "ansible_host": "a.example.com",
        "ansible_port": 22,
        "ansible_user": "deploy",
        "ansible_ssh_private_key_file": str(tmp_path / "id_ed25519"),
        "ansible_ssh_common_args": SERVERS_SSH_ARGS,
        "ansible_password": PASSWORD_LOOKUP,
        "ansible_become": True,
        "ansible_become_password": PASSWORD_LOOKUP,
        "apull_lan_addr": "a.example.com",
    }
    assert (b["ansible_port"], b["ansible_user"]) == (2222, "root")
    assert "ansible_become_password" not in b
    assert "ansible_become" not in b


def test_servers_inventory_without_key_or_password(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, "TARGET=servers\nSSH_USER=u\nNODES=a\n"))
    hostvars = build_inventory(cfg)["_meta"]["hostvars"]["a"]
    assert not {"ansible_ssh_private_key_file", "ansible_password"} & hostvars.keys()


def test_inventory_never_holds_the_password(tmp_path: Path) -> None:
    for cfg in (lab_config(tmp_path, password_line()), servers_config(tmp_path, password_line())):
        assert cfg.ssh_password is not None and cfg.ssh_password.reveal() == PASSWORD
        text = json.dumps(build_inventory(cfg))
        assert MARKER not in text


# --- fabric_hosts -----------------------------------------------------------------------------


def test_fabric_hosts_key_and_password(tmp_path: Path) -> None:
    hosts = fabric_hosts(servers_config(tmp_path, password_line()))
    assert [(h.name, h.host, h.port, h.user) for h in hosts] == [
        ("a.example.com", "a.example.com", 22, "deploy"),
        ("b.example.com", "b.example.com", 2222, "root"),
    ]
    assert hosts[0].connect_kwargs == {
        "key_filename": str(tmp_path / "id_ed25519"),
        "password": PASSWORD,
    }
    assert MARKER not in repr(hosts)


def test_fabric_hosts_lab_key_only(tmp_path: Path, lab_cache: Path) -> None:
    hosts = fabric_hosts(lab_config(tmp_path))
    assert [h.port for h in hosts] == [layout.node_ssh_port(i) for i in (1, 2, 3)]
    assert all(h.connect_kwargs == {"key_filename": str(lab_cache / "lab_ed25519")} for h in hosts)


# --- the inventory script, ansible-inventory and the lookup plugin ----------------------------


def clean_env(tmp_path: Path, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "APULL_"))}
    env.update(
        APULL_CONFIG=str(config),
        APULL_LAB_CACHE=str(tmp_path / "lab-cache"),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_COLLECTIONS_PATH=str(REPO / "collections"),
        ANSIBLE_NOCOLOR="1",
    )
    return env


def run(cmd: list[str], tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        env=clean_env(tmp_path, config),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ansible_tool(name: str) -> str:
    tool = VENV_BIN / name
    if not tool.exists():
        pytest.skip(f"{tool} is not installed")
    return str(tool)


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_script_list_needs_only_the_standard_library(tmp_path: Path) -> None:
    config = write_config(tmp_path, "SSH_USER=root\n" + password_line(), mode=0o644)
    # -S: no site-packages at all, as when Ansible runs the script with a bare python3
    res = run([sys.executable, "-S", str(SCRIPT), "--list"], tmp_path, config)
    assert res.returncode == 0, res.stderr
    inv: dict[str, Any] = json.loads(res.stdout)
    assert inv["apull_nodes"]["hosts"] == ["node1", "node2", "node3"]
    assert inv["_meta"]["hostvars"]["node1"]["ansible_password"] == PASSWORD_LOOKUP
    assert "chmod 600" in res.stderr  # the readable-file warning
    assert MARKER not in res.stdout + res.stderr


def test_script_runs_by_its_shebang(tmp_path: Path) -> None:
    config = write_config(tmp_path, "TARGET=servers\nSSH_USER=u\nNODES=a b:2200\n")
    res = run([str(SCRIPT), "--list"], tmp_path, config)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["apull_nodes"]["hosts"] == ["a", "b"]
    assert res.stderr == ""


def test_script_host_is_empty(tmp_path: Path) -> None:
    config = write_config(tmp_path, "SSH_USER=root\n")
    res = run([sys.executable, "-S", str(SCRIPT), "--host", "node1"], tmp_path, config)
    assert (res.returncode, json.loads(res.stdout)) == (0, {})


def test_script_reports_config_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, "SSH_USR=root\nTARGET=cloud\n")
    res = run([sys.executable, "-S", str(SCRIPT), "--list"], tmp_path, config)
    assert res.returncode == 1
    assert res.stdout == ""
    assert f"{config}:1: SSH_USR: unknown key 'SSH_USR' (did you mean SSH_USER?)" in res.stderr
    assert f"{config}:2: TARGET: must be 'lab' or 'servers', not 'cloud'" in res.stderr
    assert f"{config}: SSH_USER: missing (required)" in res.stderr


def test_script_reports_missing_config_file(tmp_path: Path) -> None:
    res = run([sys.executable, "-S", str(SCRIPT), "--list"], tmp_path, tmp_path / "absent.txt")
    assert res.returncode == 1
    assert f"{tmp_path / 'absent.txt'}: cannot read config file" in res.stderr


def test_ansible_inventory_never_shows_the_password(tmp_path: Path) -> None:
    config = servers_config(tmp_path, password_line()).path
    cmd = [ansible_tool("ansible-inventory"), "-i", str(SCRIPT), "--list"]
    res = run(cmd, tmp_path, config)
    assert res.returncode == 0, res.stderr
    inv = json.loads(res.stdout)
    hostvars = inv["_meta"]["hostvars"]["a.example.com"]
    assert hostvars["ansible_user"] == "deploy"
    assert hostvars["apull_target"] == "servers"
    assert MARKER not in res.stdout + res.stderr


def test_lookup_plugin_returns_the_password(tmp_path: Path) -> None:
    config = servers_config(tmp_path, password_line()).path
    msg = "msg={{ lookup('apull.deploy.config_secret', 'SSH_PASSWORD') }}"
    cmd = [ansible_tool("ansible"), "localhost", "-m", "ansible.builtin.debug", "-a", msg]
    res = run(cmd, tmp_path, config)
    assert res.returncode == 0, res.stdout + res.stderr
    # the one place the password may show: it comes back verbatim, not templated
    assert json.dumps(PASSWORD) in res.stdout


def test_lookup_plugin_rejects_keys_that_are_not_secrets(tmp_path: Path) -> None:
    config = write_config(tmp_path, "SSH_USER=root\n")
    msg = "msg={{ lookup('apull.deploy.config_secret', 'SSH_USER') }}"
    cmd = [ansible_tool("ansible"), "localhost", "-m", "ansible.builtin.debug", "-a", msg]
    res = run(cmd, tmp_path, config)
    assert res.returncode != 0
    assert "'SSH_USER' is not a secret key" in res.stdout + res.stderr
