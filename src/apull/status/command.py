"""`apull status [--json] [NODE...]` / `make status`: every node read at once over SSH, nothing
changed; the exit status is 0 only when every node is ready."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from apull.bundle.artefacts import Bundle, load_bundle
from apull.bundle.builder import ensure_bundle
from apull.config import ClusterConfig, ssh_endpoint
from apull.inventory import FabricHost, fabric_hosts
from apull.tasks.fabric_transport import FabricTransport, connect
from apull.tasks.sync_bin import MAX_PARALLEL, log_console

from . import view
from .assess import NodeStatus, State, assess, expected_binaries
from .probe import parse_report, probe_script

#: How long one node's probe may take once connected (hashing the binaries, ctr, journalctl).
PROBE_TIMEOUT_S = 60


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def read_node(host: FabricHost, script: str, check_known_hosts: bool) -> NodeStatus:
    """One node's report, or why there is none (then the node counts as unreachable)."""
    status = NodeStatus(host.name, ssh_endpoint(host.user, host.host, host.port))
    started = time.monotonic()
    try:
        with connect(host, check_known_hosts) as conn:
            output = FabricTransport(conn).run_script(script, timeout=PROBE_TIMEOUT_S)
        status.report = parse_report(output)
    except Exception as err:  # one node's failure is that node's state, not the run's
        status.error = _short(err)
    status.seconds = time.monotonic() - started
    return status


def status(
    cfg: ClusterConfig,
    *,
    only: Sequence[str] = (),
    as_json: bool = False,
    prebuilt: Path | None = None,
    console: Console | None = None,
) -> int:
    """0 when every node asked for is ready, 1 when one is not, 2 for an unknown node."""
    console = console or log_console()
    hosts = fabric_hosts(cfg)
    unknown = sorted(set(only) - {h.name for h in hosts})
    if unknown:
        known = ", ".join(h.name for h in hosts)
        print(f"apull status: unknown node(s) {', '.join(unknown)} (config: {known})",
              file=sys.stderr)  # fmt: skip
        return 2
    if only:
        hosts = [h for h in hosts if h.name in only]
    bundle: Bundle = load_bundle(prebuilt) if prebuilt else ensure_bundle()[0]
    script = probe_script(expected_binaries(bundle))
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, max(1, len(hosts)))) as pool:
        futures = [pool.submit(read_node, h, script, cfg.target != "lab") for h in hosts]
        statuses = [assess(f.result(), bundle) for f in futures]
    seconds = time.monotonic() - started
    if as_json:
        sys.stdout.write(json.dumps(view.document(statuses, bundle, seconds), indent=1) + "\n")
    else:
        console.print(view.fleet_table(statuses, bundle))
        images = view.images_table(statuses)
        if images is not None:
            console.print(images)
        for line in view.findings_lines(statuses):
            console.print(line)
        console.print(view.rollup_line(statuses, seconds))
    worst = max((s.state for s in statuses), default=State.READY)
    return 0 if worst is State.READY else 1
