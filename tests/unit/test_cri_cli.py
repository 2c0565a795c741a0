"""`apull cri ...` on the controller: every argument after `cri` is the cri command's."""

from __future__ import annotations

from pathlib import Path

import pytest

from apull import cli


def test_help_is_the_cri_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", "/nonexistent/config.txt", "cri", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: apull cri [-h] [--address ADDRESS]")


def test_a_missing_containerd_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    socket = f"{tmp_path}/containerd.sock"
    assert cli.main(["cri", "--address", socket, "ls"]) == 1
    assert f"apull cri ls: cannot reach containerd on {socket}" in capsys.readouterr().err


def test_pull_needs_an_image(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cri", "pull"])
    assert exit_.value.code == 2
    assert "the following arguments are required: image" in capsys.readouterr().err
