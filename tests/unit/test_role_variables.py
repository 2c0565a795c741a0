"""One place per setting: every role variable is declared in defaults/main.yml and in
meta/argument_specs.yml with the same default; the apull role's defaults are the settings
loader's own defaults, key by key; and the values several parts share (the snapshotter's
socket and plugin name) agree everywhere they are written down."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from apull.containerd import config_patch
from apull.status import probe
from apull_node.service import settings

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "defaults/main.yml").exists())


def defaults(role: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "roles" / role / "defaults/main.yml").read_text()) or {}


def specs(role: str) -> dict[str, dict[str, Any]]:
    """entry point -> its options."""
    text = (ROOT / "roles" / role / "meta/argument_specs.yml").read_text()
    return {
        ep: body.get("options") or {} for ep, body in yaml.safe_load(text)["argument_specs"].items()
    }


def test_every_role_is_checked() -> None:
    assert len(ROLES) >= 8 and "apull" in ROLES and "containerd" in ROLES


@pytest.mark.parametrize("role", ROLES)
def test_defaults_and_argument_specs_agree(role: str) -> None:
    values, entry_points = defaults(role), specs(role)
    declared = {name for options in entry_points.values() for name in options}
    assert sorted(set(values) - declared) == [], "in defaults/main.yml, not in argument_specs"
    for entry, options in entry_points.items():
        for name, option in options.items():
            if "default" not in option or option["default"] is None:
                continue
            assert name in values, f"{entry}: {name} has a spec default but no defaults entry"
            value = values[name]
            if isinstance(value, str) and "{{" in value:
                continue  # computed from another variable: its spec states the usual result
            assert option["default"] == value, f"{entry}: {name}"


def _template_keys() -> dict[tuple[str, str], str]:
    """(section, key) -> the apull role variable the settings template writes there."""
    found, section = {}, ""
    for line in (ROOT / "roles/apull/templates/config.toml.j2").read_text().splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = m[1]
        elif m := re.fullmatch(r"(\w+) = \"?\{\{ (\w+)\b.*", line.strip()):
            found[(section, m[1])] = m[2]
    return found


def test_the_apull_role_writes_every_setting_with_the_loaders_default() -> None:
    written, role = _template_keys(), defaults("apull")
    sections = {"global": settings.GlobalSettings, "snapshotter": settings.SnapshotterSettings,
                "apulld": settings.ApulldSettings}  # fmt: skip
    loader = {(name, f.name): f.default for name, cls in sections.items()
              for f in dataclasses.fields(cls)}  # fmt: skip
    assert sorted(set(loader) - set(written)) == [], "settings the role never writes"
    assert sorted(set(written) - set(loader)) == [], "keys the loader would refuse"
    for key, variable in written.items():
        value = role[variable]
        if isinstance(value, str) and "{{" in value:
            continue  # from the inventory (the registry, its insecure flag)
        expected = loader[key]
        if isinstance(expected, tuple):
            expected = list(expected)
        assert value == expected, f"{key}: role {variable}={value!r}, loader {expected!r}"


def test_the_snapshotters_socket_and_name_agree_everywhere() -> None:
    socket = settings.SnapshotterSettings().address
    assert defaults("apull")["apull_snapshotter_address"] == socket
    assert defaults("containerd")["containerd_proxy_address"] == socket
    assert socket == config_patch.DEFAULT_PROXY_ADDRESS
    name = defaults("containerd")["containerd_snapshotter_name"]
    assert config_patch.DEFAULT_SNAPSHOTTER == name == probe.SNAPSHOTTER
    assert defaults("apull")["apull_snapshotter_name"] == name


def test_one_inventory_value_sets_both_roles_socket_and_name(tmp_path: Path) -> None:
    """One place per shared value: the inventory's apull_snapshotter_address and _name reach
    the containerd role's variables too (asked of real Ansible, with the shipped config)."""
    group_vars = yaml.safe_load((ROOT / "inventory/group_vars/all.yml").read_text())
    assert group_vars["apull_snapshotter_address"] == defaults("apull")["apull_snapshotter_address"]
    assert group_vars["apull_snapshotter_name"] == defaults("apull")["apull_snapshotter_name"]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
           "APULL_CONFIG": str(ROOT / "config.txt")}  # fmt: skip
    ansible = str(Path(sys.executable).parent / "ansible")
    shown = subprocess.run(
        [ansible, "node1", "-c", "local", "-m", "ansible.builtin.debug",
         "-a", "msg='{{ containerd_proxy_address }} {{ containerd_snapshotter_name }}'",
         "-e", "apull_snapshotter_address=/run/other.sock", "-e", "apull_snapshotter_name=lazy"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert '"msg": "/run/other.sock lazy"' in shown.stdout
