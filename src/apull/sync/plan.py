"""Compare a node's binaries with a bundle's and decide what to do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from apull.bundle.artefacts import BuiltBinary, NodePlatform

from .remote_scripts import after_marker, parse_platform

MISSING = "-"


class Action(Enum):
    UNCHANGED = "unchanged"
    INSTALL = "install"  # absent on the node
    UPDATE = "update"  # present, different
    ROLLBACK = "rollback"
    NO_PREVIOUS = "no previous"

    @property
    def done(self) -> str:
        """How a report says it: "installed", "updated", "rolled back", ..."""
        return _DONE[self]


_DONE = {
    Action.UNCHANGED: "unchanged",
    Action.INSTALL: "installed",
    Action.UPDATE: "updated",
    Action.ROLLBACK: "rolled back",
    Action.NO_PREVIOUS: "no previous",
}


@dataclass(frozen=True)
class NodeBinaryState:
    name: str
    installed: str  # sha256 or MISSING
    previous: str  # sha256 or MISSING
    service_state: str  # systemctl is-active output


class StateParseError(Exception):
    """The node's answer to the state script is not what it prints."""


def parse_state(
    output: str, names: tuple[str, ...]
) -> tuple[NodePlatform, dict[str, NodeBinaryState]]:
    """The node's platform and each binary's state, from the state script's output."""
    states: dict[str, NodeBinaryState] = {}
    node: NodePlatform | None = None
    for line in after_marker(output):
        found = parse_platform(line)
        if found is not None:
            node = found
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise StateParseError(f"unexpected line from node: {line!r}")
        name, installed, previous, service_state = fields
        states[name] = NodeBinaryState(name, installed, previous, service_state or "unknown")
    missing = set(names) - set(states)
    if missing:
        raise StateParseError(f"node did not report {', '.join(sorted(missing))}")
    if node is None:
        raise StateParseError("node did not report its platform")
    return node, states


@dataclass(frozen=True)
class Step:
    binary: BuiltBinary
    action: Action
    state: NodeBinaryState

    @property
    def changes(self) -> bool:
        return self.action in (Action.INSTALL, Action.UPDATE, Action.ROLLBACK)


def plan_sync(binaries: tuple[BuiltBinary, ...], states: dict[str, NodeBinaryState]) -> list[Step]:
    steps = []
    for b in binaries:
        state = states[b.name]
        if state.installed == b.sha256:
            action = Action.UNCHANGED
        elif state.installed == MISSING:
            action = Action.INSTALL
        else:
            action = Action.UPDATE
        steps.append(Step(b, action, state))
    return steps


def plan_rollback(
    binaries: tuple[BuiltBinary, ...], states: dict[str, NodeBinaryState]
) -> list[Step]:
    steps = []
    for b in binaries:
        state = states[b.name]
        if state.previous == MISSING:
            action = Action.NO_PREVIOUS
        elif state.previous == state.installed:
            action = Action.UNCHANGED
        else:
            action = Action.ROLLBACK
        steps.append(Step(b, action, state))
    return steps


def services_to_restart(steps: list[Step]) -> list[str]:
    """Services whose binary changed and that were running (others start when enabled)."""
    return sorted(
        {s.binary.service for s in steps if s.changes and s.state.service_state == "active"}
    )
