"""apull.deploy.node_files run as Ansible runs a module (its file, the arguments as JSON) on
files in a temporary directory: it creates what is missing, a second call changes nothing,
only what differs is written (content) or fixed (mode), check mode writes nothing and gives
the diff, and a failure names the path and what was changed before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "collections/ansible_collections/apull/deploy/plugins/modules/node_files.py"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="writes files owned by root")


def node_files(tmp_path: Path, check: bool = False, **args: Any) -> dict[str, Any]:
    spec = tmp_path / "args.json"
    spec.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**args, "_ansible_check_mode": check}}))
    done = subprocess.run([sys.executable, str(MODULE), str(spec)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    return json.loads(done.stdout)


def layout(tmp_path: Path, unit: str = "[Service]\nExecStart=/bin/true\n") -> dict[str, Any]:
    etc = tmp_path / "etc"
    return {
        "directories": [
            {"path": str(etc), "mode": "0750"},
            {"path": str(etc / "d"), "mode": "0700"},
        ],
        "files": [
            {"dest": str(etc / "config.toml"), "content": "a = 1\n", "mode": "0640"},
            {"dest": str(etc / "d" / "x.service"), "content": unit, "mode": "0644"},
        ],
    }


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_creates_then_changes_nothing(tmp_path: Path) -> None:
    first = node_files(tmp_path, **layout(tmp_path))
    etc = tmp_path / "etc"
    assert first["changed"] is True
    assert first["changed_paths"] == [str(etc), str(etc / "d"), str(etc / "config.toml"),
                                      str(etc / "d" / "x.service")]  # fmt: skip
    assert first["written"] == [str(etc / "config.toml"), str(etc / "d" / "x.service")]
    assert (etc / "config.toml").read_text() == "a = 1\n"
    assert (mode(etc), mode(etc / "d"), mode(etc / "config.toml")) == (0o750, 0o700, 0o640)
    assert mode(etc / "d" / "x.service") == 0o644
    second = node_files(tmp_path, **layout(tmp_path))
    assert (second["changed"], second["changed_paths"], second["written"]) == (False, [], [])
    assert sorted(p.name for p in etc.iterdir()) == ["config.toml", "d"]  # no temporary left


def test_only_what_differs_is_written_or_fixed(tmp_path: Path) -> None:
    node_files(tmp_path, **layout(tmp_path))
    etc = tmp_path / "etc"
    inode = (etc / "config.toml").stat().st_ino
    (etc / "config.toml").chmod(0o666)
    result = node_files(tmp_path, **layout(tmp_path, unit="[Service]\nExecStart=/bin/false\n"))
    assert result["changed_paths"] == [str(etc / "config.toml"), str(etc / "d" / "x.service")]
    assert result["written"] == [str(etc / "d" / "x.service")]  # the mode alone was fixed
    assert (etc / "config.toml").stat().st_ino == inode
    assert mode(etc / "config.toml") == 0o640
    assert "/bin/false" in (etc / "d" / "x.service").read_text()


def test_check_mode_writes_nothing_and_gives_the_diff(tmp_path: Path) -> None:
    node_files(tmp_path, **layout(tmp_path))
    etc = tmp_path / "etc"
    result = node_files(tmp_path, check=True,
                        **layout(tmp_path, unit="[Service]\nExecStart=/bin/false\n"))  # fmt: skip
    assert result["changed"] is True
    assert result["written"] == [str(etc / "d" / "x.service")]
    [diff] = result["diff"]
    assert diff["before"] == "[Service]\nExecStart=/bin/true\n"
    assert diff["after"] == "[Service]\nExecStart=/bin/false\n"
    assert "/bin/true" in (etc / "d" / "x.service").read_text()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    missing = node_files(fresh, check=True, **layout(fresh))
    assert len(missing["changed_paths"]) == 4
    assert missing["diff"][0]["before"] == "absent\n"
    assert not (fresh / "etc").exists()


def test_a_failure_names_the_path_and_what_was_done_before(tmp_path: Path) -> None:
    args = layout(tmp_path)
    (tmp_path / "etc").write_text("a file where a directory belongs")
    result = node_files(tmp_path, **args)
    assert result["failed"] is True
    assert result["msg"] == f"{tmp_path / 'etc'} exists and is not a directory (changed before " \
                            "the failure: none)"  # fmt: skip
    bad = {"files": [{"dest": str(tmp_path / "x"), "content": "", "mode": "rw-r--r--"}]}
    result = node_files(tmp_path, **bad)
    assert result["msg"].startswith(f"{tmp_path / 'x'}: mode 'rw-r--r--' is not an octal mode")
    assert not (tmp_path / "x").exists()
