"""`apull sync-bin` / `fab sync-bin` / tools/sync_bin.sh: the node binaries to every node.

Replaces the old tools/sync_bin.sh: same inventory (config.txt, or a legacy servers.txt with
--servers), but parallel, checksummed, atomic, reversible (--rollback) and quiet about what
did not change.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from apull.bundle.artefacts import ANY, Bundle, load_bundle
from apull.bundle.builder import ensure_bundle
from apull.config import ClusterConfig
from apull.inventory import FabricHost, fabric_hosts
from apull.sync.engine import NodeResult, sync_node
from apull.sync.plan import Action

from .fabric_transport import FabricTransport, connect

MAX_PARALLEL = 16


@dataclass
class NodeOutcome:
    host: FabricHost
    result: NodeResult | None = None
    error: str = ""


def _sync_one(
    host: FabricHost,
    bundle: Bundle,
    rollback: bool,
    check: bool,
    check_known_hosts: bool,
    say: threading.Lock,
    console: Console,
) -> NodeOutcome:
    def event(text: str) -> None:
        with say:
            console.print(f"[bold]{host.name}[/]: {text}")

    outcome = NodeOutcome(host)
    try:
        with connect(host, check_known_hosts) as conn:
            outcome.result = sync_node(
                FabricTransport(conn), bundle, rollback=rollback, check=check, on_event=event
            )
    except Exception as err:  # one node's failure must not stop the others
        outcome.error = _short_error(err)
        event(f"[red]failed:[/] {outcome.error}")
    return outcome


def _short_error(err: Exception) -> str:
    text = str(err).strip().splitlines()
    message = text[-1] if text else ""
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _cell(outcome: NodeOutcome, name: str, check: bool) -> str:
    if outcome.result is None:
        return "-"
    step = next(s for s in outcome.result.steps if s.binary.name == name)
    if step.action is Action.UNCHANGED:
        return "[dim]unchanged[/]"
    if step.action is Action.NO_PREVIOUS:
        return "[yellow]no previous[/]"
    done = step.action.done
    return f"[yellow]would be {done}[/]" if check else f"[green]{done}[/]"


#: Table width when the output is a log, not a terminal (rich would assume 80 columns and cut
#: cells short: "instal…").
LOG_WIDTH = 160


def log_console() -> Console:
    """Standard output; as wide as the terminal, or LOG_WIDTH for a log (COLUMNS rules)."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=LOG_WIDTH if piped else None)


def _platform_cell(result: NodeResult | None) -> str:
    """The build the node gets (its native artefacts' platform: x86_64-cp311), short enough
    for an 80-column table; the node's full platform is in the refusal when there is none."""
    if result is None:
        return "-"
    native = sorted({s.binary.platform for s in result.steps} - {ANY})
    return ", ".join(native) or (result.platform.arch if result.platform else "-")


def summary_table(outcomes: Sequence[NodeOutcome], bundle: Bundle, check: bool) -> Table:
    table = Table(title=f"sync-bin: bundle {bundle.version} ({bundle.fingerprint[:12]})")
    table.add_column("node")
    table.add_column("platform")
    for name in bundle.names:
        table.add_column(name)
    table.add_column("restarted")
    table.add_column("sent")
    table.add_column("time")
    table.add_column("result")
    for o in outcomes:
        r = o.result
        table.add_row(
            o.host.name,
            _platform_cell(r),
            *(_cell(o, name, check) for name in bundle.names),
            ", ".join(r.restarted) if r and r.restarted else "-",
            f"{r.bytes_sent / 1e6:.1f} MB" if r else "-",
            f"{r.seconds:.1f} s" if r else "-",
            f"[red]FAILED: {o.error}[/]" if o.error else "[green]ok[/]",
        )
    return table


def sync_bin(
    cfg: ClusterConfig,
    *,
    rollback: bool = False,
    check: bool = False,
    only: Sequence[str] = (),
    bundle_dir: Path | None = None,
    prebuilt: Path | None = None,
    console: Console | None = None,
) -> int:
    """Sync (or roll back) every node; 0 when all succeeded, 1 naming the failed nodes."""
    console = console or log_console()
    hosts = fabric_hosts(cfg)
    if only:
        unknown = sorted(set(only) - {h.name for h in hosts})
        if unknown:
            console.print(f"[red]unknown node(s):[/] {', '.join(unknown)}")
            return 2
        hosts = [h for h in hosts if h.name in only]
    if prebuilt is not None:
        bundle, how = load_bundle(prebuilt), "prebuilt"
    else:
        bundle, built = ensure_bundle(bundle_dir)
        how = "built" if built else "up to date"
    console.print(
        f"bundle {bundle.directory} ({how}): {len(bundle.binaries)} artefacts of "
        + ", ".join(bundle.names)
        + "; each node gets those of its platform"
    )
    what = "rollback" if rollback else "sync"
    console.print(f"{what} to {len(hosts)} node(s){' (check only)' if check else ''}")
    started = time.monotonic()
    say = threading.Lock()
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, max(1, len(hosts)))) as pool:
        futures = [
            pool.submit(_sync_one, h, bundle, rollback, check, cfg.target != "lab", say, console)
            for h in hosts
        ]
        outcomes = [f.result() for f in futures]
    console.print(summary_table(outcomes, bundle, check))
    failed = [o.host.name for o in outcomes if o.error]
    changed = [o.host.name for o in outcomes if o.result and o.result.changed]
    elapsed = time.monotonic() - started
    if failed:
        console.print(f"[red]{what} failed on {len(failed)} node(s): {', '.join(failed)}[/]")
        return 1
    state = "would change" if check else "changed"
    console.print(
        f"{what} done in {elapsed:.1f} s: {len(changed)} node(s) {state}"
        + (f" ({', '.join(changed)})" if changed else ", nothing to do")
    )
    return 0
