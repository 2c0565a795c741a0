"""A bad config.txt stops `apull run` before anything reaches a node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bad_config_stops_before_any_node_is_touched(tmp_path):
    bad = tmp_path / "config.txt"
    bad.write_text("TARGET=lab\nSSH_USR=root\n")
    result = subprocess.run(
        [sys.executable, "-m", "apull.cli", "--config", str(bad), "run", "site", "--no-lab"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{bad}:2: SSH_USR: unknown key 'SSH_USR' (did you mean SSH_USER?)" in result.stderr
    assert f"{bad}: SSH_USER: missing (required)" in result.stderr
    assert "nothing was run." in result.stderr
    assert "PLAY" not in result.stdout
