"""A bad config.txt stops `apull run` before anything reaches a node."""

from __future__ import annotations

from conftest import apull


def test_bad_config_stops_before_any_node_is_touched(tmp_path):
    bad = tmp_path / "config.txt"
    bad.write_text("TARGET=lab\nSSH_USR=root\n")
    result = apull("--config", str(bad), "run", "site", "--no-lab", timeout=120)
    assert result.returncode == 2
    assert f"{bad}:2: SSH_USR: unknown key 'SSH_USR' (did you mean SSH_USER?)" in result.stderr
    assert f"{bad}: SSH_USER: missing (required)" in result.stderr
    assert "nothing was run." in result.stderr
    assert "PLAY" not in result.stdout
