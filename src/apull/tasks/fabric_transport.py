"""The sync engine's transport over a Fabric connection (sudo when the login is not root)."""

from __future__ import annotations

import shlex
from pathlib import Path

from fabric import Config, Connection  # type: ignore[import-untyped]

from apull.inventory import FabricHost

CONNECT_TIMEOUT_S = 10


def connect(host: FabricHost, check_known_hosts: bool) -> Connection:
    """A connection to `host`; with `check_known_hosts`, a changed host key is refused."""
    overrides: dict[str, object] = {"load_ssh_configs": False}
    password = host.connect_kwargs.get("password")
    if password is not None:
        overrides["sudo"] = {"password": password}
    conn = Connection(
        host.host,
        user=host.user,
        port=host.port,
        connect_kwargs=dict(host.connect_kwargs),
        connect_timeout=CONNECT_TIMEOUT_S,
        config=Config(overrides=overrides),
    )
    if check_known_hosts:
        # Known keys must match; unknown hosts are accepted (like ssh's accept-new).
        conn.client.load_system_host_keys()
    return conn


class FabricTransport:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.uploads_as_root = conn.user == "root"

    def run_script(self, script: str, timeout: float | None = None) -> str:
        runner = self.conn.run if self.uploads_as_root else self.conn.sudo
        # As an argument, not on stdin: Invoke feeds stdin a byte at a time (10 ms each).
        result = runner(
            f"sh -c {shlex.quote(script)}", hide=True, warn=True, in_stream=False, timeout=timeout
        )
        if result.exited != 0:
            raise RuntimeError(
                f"script failed (exit {result.exited}): {result.stderr.strip()[-300:]}"
            )
        return str(result.stdout)

    def upload(self, local: Path, remote: str) -> None:
        self.conn.put(str(local), remote)

    def scratch_path(self, name: str) -> str:
        return f"/tmp/{name}"
