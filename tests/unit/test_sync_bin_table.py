"""sync-bin's closing table: each node's build, every cell whole in a log (not cut at 80)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from apull.bundle.artefacts import BuiltBinary, Bundle, NodePlatform
from apull.inventory import FabricHost
from apull.sync.engine import NodeResult
from apull.sync.plan import Action, NodeBinaryState, Step
from apull.tasks.sync_bin import LOG_WIDTH, NodeOutcome, summary_table

SNAPSHOTTER = BuiltBinary(
    "apull-containerd-grpc", "/usr/bin/apull-containerd-grpc", "0550",
    "apull-snapshotter.service", "a" * 64, 7_000_000, platform="aarch64-cp39",
)  # fmt: skip
APULLD = BuiltBinary("apulld", "/usr/bin/apulld", "0550", "apulld.service", "b" * 64, 100_000)


def test_each_row_names_the_build_its_node_got_and_no_cell_is_cut() -> None:
    bundle = Bundle(Path("/nonexistent"), "0.1.0", "f" * 64, (SNAPSHOTTER, APULLD))
    state = NodeBinaryState("x", "-", "-", "active")
    installed = NodeResult(
        steps=[Step(SNAPSHOTTER, Action.INSTALL, state), Step(APULLD, Action.INSTALL, state)],
        restarted=["apull-snapshotter.service", "apulld.service"],
        platform=NodePlatform("aarch64", "2.31", "3.9"),
    )
    outcomes = [
        NodeOutcome(FabricHost("node1", "127.0.0.1", 2221, "root", {}), installed),
        NodeOutcome(FabricHost("node9", "127.0.0.1", 2229, "root", {}), None, "refused"),
    ]
    console = Console(width=LOG_WIDTH, record=True, highlight=False)
    console.print(summary_table(outcomes, bundle, check=False))
    rows = {m[1]: m[0] for m in re.finditer(r"^│ (\S+)\s+│.*$", console.export_text(), re.M)}
    assert "│ aarch64-cp39 │" in rows["node1"]
    assert rows["node1"].count("installed") == 2
    assert "FAILED: refused" in rows["node9"]


def test_a_log_gets_the_wide_table() -> None:
    code = "from apull.tasks.sync_bin import log_console; print(log_console().width)"
    env = {"PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == str(LOG_WIDTH), run.stderr
    env["COLUMNS"] = "100"  # an operator's COLUMNS still rules
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == "100", run.stderr
