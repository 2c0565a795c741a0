"""Fabric tasks: `fab sync-bin [--rollback] [--check] [--servers tools/servers.txt]`.

The work is in apull.tasks.sync_bin (also `apull sync-bin` and tools/sync_bin.sh).
"""

from __future__ import annotations

from pathlib import Path

from fabric import task  # type: ignore[import-untyped]
from invoke.exceptions import Exit

from apull.config import (
    ConfigError,
    default_config_path,
    format_problems,
    load_config,
    load_config_with_servers,
)
from apull.tasks.sync_bin import sync_bin as run_sync_bin


@task(  # type: ignore[untyped-decorator]
    help={
        "rollback": "put back the previous binaries",
        "check": "say what would change, change nothing",
        "servers": "a legacy servers.txt to sync to (SSH_* still from config.txt)",
        "nodes": "comma-separated node names (default: all)",
    }
)
def sync_bin(c: object, rollback: bool = False, check: bool = False, servers: str = "",
             nodes: str = "") -> None:  # fmt: skip
    """Install the apull node binaries on every node (replaces tools/sync_bin.sh)."""
    path = default_config_path()
    try:
        cfg = load_config_with_servers(path, Path(servers)) if servers else load_config(path)
    except ConfigError as err:
        raise Exit(format_problems(err), code=2) from err
    only = [n for n in nodes.split(",") if n]
    rc = run_sync_bin(cfg, rollback=rollback, check=check, only=only)
    if rc:
        raise Exit(code=rc)
