"""The apull role's settings file and registry credentials, rendered by the real
ansible-playbook from the lab's inventory (config.txt as shipped: TARGET=lab) and read back
by the settings loader apulld uses."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apull_node.service.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr3t-Pa55word-never-logged"

PLAY = """
- name: Render the apull role's settings on the controller
  hosts: {hosts}
  connection: local
  gather_facts: false
  tasks:
    - name: Registry credentials, as the role writes them
      ansible.builtin.import_role:
        name: apull
        tasks_from: registry_auth.yml
      when: apull_registry_auths | length > 0
    - name: Settings file, as the role writes it
      ansible.builtin.template:
        src: {root}/roles/apull/templates/config.toml.j2
        dest: {out}/config.toml
        mode: "0640"
"""


def playbook(
    tmp_path: Path, *extra: str, hosts: str = "localhost"
) -> subprocess.CompletedProcess[str]:
    play = tmp_path / "play.yml"
    play.write_text(PLAY.format(root=ROOT, out=tmp_path, hosts=hosts))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "APULL_CONFIG": str(ROOT / "config.txt"),
        "APULL_REPORT_DIR": str(tmp_path / "reports"),
    }
    inventory = str(ROOT / "inventory/apull_inventory.py")
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", inventory, str(play),
           "--diff", "-v", *extra]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_lab_inventory_makes_its_registry_insecure_for_apulld(tmp_path):
    playbook(tmp_path)
    apulld = load_settings(tmp_path / "config.toml").apulld
    assert apulld.registry_insecure == ("registry.lab:5000",)
    assert apulld.registry_mirrors == ()
    assert (tmp_path / "config.toml").read_text().count("\nversion = 1\n") == 1
    assert (apulld.fetch_retries, apulld.fetch_timeout_s) == (4, 30)
    assert (apulld.cache_size_limit_mb, apulld.thread_num) == (10240, 4)
    assert apulld.registry_auth_file == "/etc/apull/registry-auth.json"
    assert apulld.fuse_mountpoint == ""
    assert load_settings(tmp_path / "config.toml").snapshotter.layer_read_ahead_kb == 1024
    # Metrics are off unless asked for.
    assert apulld.metrics_address == ""
    assert load_settings(tmp_path / "config.toml").snapshotter.metrics_address == ""


def test_every_lazy_serving_setting_is_a_role_variable(tmp_path):
    overrides = {
        "apull_registry_mirrors": ["https://mirror.one:5000", "r.example=http://m.two"],
        "apull_registry_insecure_hosts": ["a.example:5000", "b.example"],
        "apull_fetch_retries": 7,
        "apull_fetch_timeout_s": 9,
        "apull_cache_size_limit_mb": 512,
        "apull_thread_num": 12,
        "apull_registry_auth_file": "/srv/auth.json",
        "apull_fuse_mountpoint": "/srv/fuse",
        "apull_backend": "file",
        "apull_layer_read_ahead_kb": 512,
        "apull_apulld_metrics_address": "127.0.0.1:9810",
        "apull_snapshotter_metrics_address": "[::1]:9811",
    }
    playbook(tmp_path, "-e", json.dumps(overrides))
    apulld = load_settings(tmp_path / "config.toml").apulld
    assert apulld.registry_mirrors == ("https://mirror.one:5000", "r.example=http://m.two")
    assert apulld.registry_insecure == ("a.example:5000", "b.example")
    assert (apulld.fetch_retries, apulld.fetch_timeout_s) == (7, 9)
    assert (apulld.cache_size_limit_mb, apulld.thread_num) == (512, 12)
    assert apulld.registry_auth_file == "/srv/auth.json"
    assert (apulld.fuse_mountpoint, apulld.backend) == ("/srv/fuse", "file")
    assert load_settings(tmp_path / "config.toml").snapshotter.layer_read_ahead_kb == 512
    assert apulld.metrics_address == "127.0.0.1:9810"
    assert load_settings(tmp_path / "config.toml").snapshotter.metrics_address == "[::1]:9811"


@pytest.mark.skipif(os.geteuid() != 0, reason="the credentials file is owned by root")
def test_registry_credentials_are_written_but_never_shown(tmp_path):
    auth = tmp_path / "registry-auth.json"
    extra = {
        "apull_registry_auth_file": str(auth),
        "apull_registry_auths": {"registry.example:5000": {"username": "puller",
                                                           "password": PASSWORD}},
    }  # fmt: skip
    first = playbook(tmp_path, "-e", json.dumps(extra))
    encoded = base64.b64encode(f"puller:{PASSWORD}".encode()).decode()
    document = json.loads(auth.read_text())
    assert document == {"auths": {"registry.example:5000": {"auth": encoded}}}
    assert auth.stat().st_mode & 0o777 == 0o600
    second = playbook(tmp_path, "-e", json.dumps(extra))
    assert "changed=0" in second.stdout.split("PLAY RECAP")[1]
    for run in (first, second):
        for secret in (PASSWORD, encoded):
            assert secret not in run.stdout and secret not in run.stderr
        assert "censored" in run.stdout  # the task ran, its output hidden
    bad = {**extra, "apull_registry_auths": {"r.example": {"username": "x"}}}
    play = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i",
         str(ROOT / "inventory/apull_inventory.py"), str(tmp_path / "play.yml"), "-e",
         json.dumps(bad)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
             "APULL_REPORT_DIR": str(tmp_path / "reports")},
    )  # fmt: skip
    assert play.returncode != 0
    assert "apull_registry_auths[r.example] needs a username and a password" in play.stdout


def test_peer_sharing_names_the_node_and_every_other_node_as_peers(tmp_path):
    from apull.lab import layout

    playbook(tmp_path, "-e", "apull_peer_sharing=true", hosts="node1")
    apulld = load_settings(tmp_path / "config.toml").apulld
    others = [layout.node_lan_addr(2), layout.node_lan_addr(3)]
    assert apulld.peer_address == f"{layout.node_lan_addr(1)}:5050"
    assert list(apulld.peer_allow) == others
    assert list(apulld.peers) == [f"http://{address}:5050" for address in others]
    playbook(tmp_path, hosts="node1")
    off = load_settings(tmp_path / "config.toml").apulld
    assert (off.peer_address, off.peer_allow, off.peers) == ("", (), ())
