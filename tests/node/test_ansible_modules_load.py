"""Every Ansible module of ours that runs on a node (it builds an AnsibleModule; the others
document action plugins, which run on the controller) loads under this python3: under
make unit-py39 that is Debian 11's 3.9, under make unit-py39-arm64 the same on aarch64."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_support import MODULES, ansible_module

ON_NODE = sorted(p for p in MODULES.glob("*.py") if "AnsibleModule(" in p.read_text())


def test_the_node_side_modules_are_the_ones_expected() -> None:
    assert [p.stem for p in ON_NODE] == [
        "boot_loader",
        "fs_ctl",
        "image_prewarm",
        "kernel_modules",
        "node_facts",
        "node_files",
        "stack_health",
        "systemd_units",
    ]


@pytest.mark.parametrize("path", ON_NODE, ids=lambda p: p.stem)
def test_a_node_side_module_loads(path: Path) -> None:
    module = ansible_module(path)
    assert callable(module.main)
    assert module.DOCUMENTATION.lstrip().startswith("---")
