"""apull.deploy.stack_health, run as Ansible runs a module (its file, the arguments as JSON):
it returns apulld's own ping answer from a real apulld, fails naming the check and the reason
when nothing answers, and reads the snapshotter's line out of `ctr plugins ls` output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from node_support import MODULES, ansible_module
from test_apulld_api import Daemon

MODULE = MODULES / "stack_health.py"
PLUGINS = """TYPE                                  ID                       PLATFORMS      STATUS
io.containerd.snapshotter.v1          overlayfs                linux/amd64    ok
io.containerd.snapshotter.v1          apull                    -              ok
io.containerd.snapshotter.v1          apullx                   -              error
"""


def run_module(tmp_path: Path, **args: Any) -> dict[str, Any]:
    spec = tmp_path / "args.json"
    spec.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    collections = str(MODULES.parents[4])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([collections, *sys.path])}
    done = subprocess.run([sys.executable, str(MODULE), str(spec)], capture_output=True,
                          text=True, timeout=120, env=env, check=False)  # fmt: skip
    return json.loads(done.stdout)


def test_apullds_answer_is_returned(tmp_path: Path) -> None:
    apulld = Daemon(tmp_path, backend="file")
    apulld.start()
    try:
        status, _, ping = apulld.request("PUT", "/v1.0/apulld/ping")
        result = run_module(tmp_path, checks=["apulld"], apulld_address=str(apulld.address))
    finally:
        apulld.stop()
        fuse = apulld.cache_dir.parent / "apulld" / "fuse"
        subprocess.run(["umount", "-l", str(fuse)], capture_output=True, check=False)
    assert status == 200
    assert result.get("failed") is not True, result
    assert result["ping"]["backend"] == ping["backend"] == "file"
    assert result["changed"] is False


def test_nothing_answering_fails_with_the_check_and_the_reason(tmp_path: Path) -> None:
    gone = tmp_path / "apulld.sock"
    result = run_module(tmp_path, checks=["apulld"], apulld_address=str(gone), timeout=0.5,
                        delay=0.2)  # fmt: skip
    assert result["failed"] is True
    assert result["msg"] == f"apulld did not answer in 0.5 s: {gone} does not exist"
    assert result["ping"] == {}
    unknown = run_module(tmp_path, checks=["apulld", "kubelet"])
    assert unknown["msg"] == "unknown checks ['kubelet'] (known: apulld, plugin, snapshots)"


def test_the_snapshotters_line_is_found_by_its_exact_name() -> None:
    health = ansible_module(MODULE)
    assert health.plugin_line(PLUGINS, "apull") == "io.containerd.snapshotter.v1 apull - ok"
    assert health.plugin_line(PLUGINS, "apullx") == "io.containerd.snapshotter.v1 apullx - error"
    assert health.plugin_line(PLUGINS, "stargz") is None
