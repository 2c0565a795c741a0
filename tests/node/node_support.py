"""Helpers the node tests share (standard library only, Python 3.9 included).

tests/node holds the tests of the node package alone (apull_node): nothing here imports the
controller's package (`apull`). `make unit-py39` runs this directory with Debian 11's
python3.9 in a build root, where only apull_node and its bundled dependencies exist.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

#: The collection's modules: the ones that run on nodes are tested here, under 3.9 too.
MODULES = (
    Path(__file__).resolve().parents[2]
    / "collections/ansible_collections/apull/deploy/plugins/modules"
)


def ansible_module(path: Path) -> ModuleType:
    """One of the collection's module files, imported as a Python module of its own (with
    the collection's module_utils importable, as Ansible ships them along)."""
    collections = str(MODULES.parents[4])
    if collections not in sys.path:
        sys.path.append(collections)
    spec = importlib.util.spec_from_file_location(f"apull_module_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stdlib_names() -> frozenset[str]:
    """Top-level names of the standard library (sys.stdlib_module_names from 3.10 on)."""
    names = getattr(sys, "stdlib_module_names", None)
    if names is not None:
        return frozenset(names)
    # Frozen into the interpreter, so in neither list nor directory.
    found = {*sys.builtin_module_names, "_frozen_importlib", "_frozen_importlib_external"}
    std = sysconfig.get_paths()["stdlib"]
    for directory in (std, os.path.join(std, "lib-dynload")):
        for entry in os.listdir(directory):
            if entry == "site-packages":
                continue
            found.add(entry.split(".")[0])
    return frozenset(found)
