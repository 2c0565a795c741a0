"""Running commands for the lab, with their output kept in a log file."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

Log = Callable[[str], None]


class LabError(RuntimeError):
    """A lab step failed; the message says which and shows the end of its log."""


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_logged(
    cmd: Sequence[str | Path], logfile: Path, what: str, env: Mapping[str, str] | None = None
) -> None:
    """Run cmd with stdout and stderr appended to logfile; raise LabError on failure."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("a") as out:
        out.write(f"\n$ {' '.join(str(c) for c in cmd)}\n")
        out.flush()
        proc = subprocess.run(
            [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env, check=False
        )
    if proc.returncode != 0:
        raise LabError(
            f"{what} failed (exit {proc.returncode}); last lines of {logfile}:\n{tail(logfile)}"
        )
