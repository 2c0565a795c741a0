"""Where the suite's own files are (playbooks, ansible.cfg, config.txt)."""

from __future__ import annotations

import os
from pathlib import Path


def suite_root() -> Path:
    """The checkout holding ansible.cfg and playbooks/ (APULL_HOME overrides)."""
    if "APULL_HOME" in os.environ:
        return Path(os.environ["APULL_HOME"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "ansible.cfg").exists() and (parent / "playbooks").is_dir():
            return parent
    return Path.cwd()
