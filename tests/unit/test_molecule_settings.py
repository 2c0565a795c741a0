"""The settings every molecule scenario shares (.config/molecule/config.yml): molecule finds
the file from each role's directory, and no scenario connects to the lab's nodes with a
shorter bound than `make all` does (ansible.cfg)."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / ".config" / "molecule" / "config.yml"
SCENARIOS = sorted(ROOT.glob("roles/*/molecule/*/molecule.yml"))


def _timeout(document: dict) -> int | None:
    options = document.get("provisioner", {}).get("config_options", {})
    value = options.get("defaults", {}).get("timeout")
    return None if value is None else int(value)


def test_molecule_finds_the_shared_file_from_a_role(monkeypatch):
    from molecule.util import lookup_config_file

    monkeypatch.chdir(ROOT / "roles" / "apull")
    found = lookup_config_file(".config/molecule/config.yml")
    assert found is not None and Path(found).resolve() == BASE.resolve()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: str(p.relative_to(ROOT / "roles")))
def test_no_scenario_connects_with_less_time_than_make_all(scenario):
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "ansible.cfg")
    wanted = cfg.getint("defaults", "timeout")
    base = _timeout(yaml.safe_load(BASE.read_text()))
    own = _timeout(yaml.safe_load(scenario.read_text()))
    effective = own if own is not None else base
    assert effective is not None and effective >= wanted, (
        f"{scenario}: timeout {effective}, ansible.cfg has {wanted}"
    )
