"""One node's sync (or rollback), over any transport that can run a script and send a file."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from apull.bundle.artefacts import Bundle, NodePlatform, UnsupportedPlatform

from . import remote_scripts
from .plan import Action, Step, parse_state, plan_rollback, plan_sync, services_to_restart


class Transport(Protocol):
    """How an installer reaches one node (Fabric's Connection, an Ansible connection, ...)."""

    #: True when uploads land as root (straight into the binary's directory).
    uploads_as_root: bool

    def run_script(self, script: str) -> str:
        """Run `script` with sh as root; return stdout; raise on a non-zero exit."""

    def upload(self, local: Path, remote: str) -> None:
        """Copy a local file to `remote` on the node."""

    def scratch_path(self, name: str) -> str:
        """A node path the login user may write, for uploads that are not made as root."""


class NodeSyncError(Exception):
    """A step on the node failed; the message says which."""


@dataclass
class NodeResult:
    steps: list[Step] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0
    platform: NodePlatform | None = None

    @property
    def changed(self) -> bool:
        return any(s.changes for s in self.steps)

    @property
    def changed_services(self) -> list[str]:
        """Services whose binary changed (running or not)."""
        return sorted({s.binary.service for s in self.steps if s.changes})


Events = Callable[[str], None]


def _noop(_: str) -> None:
    return None


def sync_node(
    transport: Transport,
    bundle: Bundle,
    *,
    rollback: bool = False,
    check: bool = False,
    restart: bool = True,
    on_event: Events = _noop,
) -> NodeResult:
    """Bring a node's binaries to the bundle's (or back to the previous ones with rollback).

    The node gets the one artefact of each binary built for its platform (arch, glibc,
    python3), read in the same round trip as the binaries' state; a node that none serves
    is refused (NodeSyncError) before anything is sent. Each binary is replaced by one
    rename, so a failure between binaries leaves each binary whole (old or new) and the
    previous one kept; services restart only after all renames.
    """
    started = time.monotonic()
    result = NodeResult()
    first_of_each = tuple(next(b for b in bundle.binaries if b.name == n) for n in bundle.names)
    script = remote_scripts.state_script(first_of_each, with_previous=rollback)
    node, states = parse_state(transport.run_script(script), bundle.names)
    result.platform = node
    try:
        binaries = bundle.for_node(node)
    except UnsupportedPlatform as err:
        raise NodeSyncError(str(err)) from err
    steps = (plan_rollback if rollback else plan_sync)(binaries, states)
    result.steps = steps
    if check:
        result.seconds = time.monotonic() - started
        return result
    for step in steps:
        binary = step.binary
        if step.action in (Action.INSTALL, Action.UPDATE):
            target = (
                remote_scripts.staging_path(binary)
                if transport.uploads_as_root
                else transport.scratch_path(f".apull-{binary.name}.upload")
            )
            on_event(f"{binary.name}: sending {binary.size / 1e6:.1f} MB")
            transport.upload(bundle.path_of(binary), target)
            result.bytes_sent += binary.size
            _expect(transport.run_script(remote_scripts.install_script(binary, target)),
                    "installed", binary.name)  # fmt: skip
            on_event(f"{binary.name}: {step.action.done}")
        elif step.action is Action.ROLLBACK:
            _expect(transport.run_script(remote_scripts.rollback_script(binary)),
                    "rolled-back", binary.name)  # fmt: skip
            on_event(f"{binary.name}: {step.action.done}")
    services = services_to_restart(steps)
    if restart and services:
        out = transport.run_script(remote_scripts.restart_script(services))
        result.restarted = remote_scripts.after_marker(out)
        on_event(f"restarted {', '.join(result.restarted) or 'nothing'}")
    result.seconds = time.monotonic() - started
    return result


def _expect(output: str, word: str, name: str) -> None:
    if word not in remote_scripts.after_marker(output):
        raise NodeSyncError(f"{name}: the node did not confirm ({output.strip()[-200:]!r})")
