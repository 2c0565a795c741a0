"""`apull status` output: the fleet table, the images table, the findings, the rollup line,
and the JSON document (its schema: docs/status.md)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from apull.bundle.artefacts import Bundle
from apull.image.convert import human_size

from .assess import NodeStatus, State

#: The JSON document's layout; a field's meaning never changes within one version.
SCHEMA_VERSION = 1

_STATE_STYLE = {
    State.READY: "green",
    State.DRIFTED: "yellow",
    State.FAILING: "red",
    State.UNREACHABLE: "red",
}


def _ago(since: float | None, now: float) -> str:
    if not since:
        return "-"
    seconds = max(0, int(now - since))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


def fraction(image: dict[str, Any]) -> float:
    total = int(image.get("bytes") or 0)
    return min(1.0, int(image.get("fetched") or 0) / total) if total else 0.0


def rollup(statuses: Sequence[NodeStatus]) -> dict[str, int]:
    counts = {state.label: 0 for state in State}
    for status in statuses:
        counts[status.state.label] += 1
    return {"nodes": len(statuses), **counts}


def fleet_table(statuses: Sequence[NodeStatus], bundle: Bundle) -> Table:
    now = time.time()
    table = Table(title=f"apull status: this checkout's bundle {bundle.fingerprint[:12]}")
    for column in ("node", "state", "platform", "kernel", "backend", "binaries", "services",
                   "containerd", "cache", "images"):  # fmt: skip
        table.add_column(column)
    for s in statuses:
        style = _STATE_STYLE[s.state]
        state = f"[{style}]{s.state.label}[/]"
        r = s.report
        if r is None:
            table.add_row(s.name, state, *["-"] * 8)
            continue
        host = r.get("host") or {}
        answer = (r.get("apulld") or {}).get("answer") or {}
        services = r.get("services") or {}
        apulld = services.get("apulld.service") or {}
        binaries = ", ".join(
            f"{b.name} {'[green]current[/]' if b.current else '[yellow]other[/]'}"
            if b.installed else f"{b.name} [red]missing[/]"
            for b in s.binaries
        )  # fmt: skip
        active = sum(1 for unit in services.values() if unit.get("active") == "active")
        plugin = (r.get("plugin") or {}).get("status") or "-"
        patched = "-"
        if s.config is not None:
            patched = "patched" if s.config.patched else "[yellow]not patched[/]"
        cache = r.get("cache") or {}
        images = r.get("images") or []
        table.add_row(
            s.name,
            state,
            f"{host.get('arch', '?')} py{host.get('python', '?')}",
            str(host.get("kernel", "?")),
            str(answer.get("backend") or "[red]down[/]"),
            binaries,
            f"{active}/{len(services)} active, apulld "
            + (
                f"up {_ago(apulld.get('since'), now)}"
                if apulld.get("active") == "active"
                else f"[red]{apulld.get('active') or 'unknown'}[/]"
            ),
            f"plugin {plugin}, {patched}",
            " / ".join(human_size(int(cache.get(k) or 0)) for k in ("bytes", "limit_bytes")),
            str(len(images)),
        )
    return table


def images_table(statuses: Sequence[NodeStatus]) -> Table | None:
    rows = [(s.name, image) for s in statuses if s.report for image in s.report.get("images") or []]
    if not rows:
        return None
    table = Table(title="images pulled through apull")
    for column in ("node", "image", "layers", "size", "fetched"):
        table.add_column(column)
    for name, image in rows:
        table.add_row(
            name, str(image["image"]), str(image["layers"]), human_size(int(image["bytes"])),
            f"{fraction(image):.0%} ({human_size(int(image['fetched']))})",
        )  # fmt: skip
    return table


def findings_lines(statuses: Sequence[NodeStatus]) -> list[str]:
    lines = []
    for s in statuses:
        if s.report is None:
            lines.append(f"[red]{s.name}: unreachable: {escape(s.error)}[/]")
        for f in s.findings:
            colour = {"fail": "red", "drift": "yellow", "warn": "dim"}[f.level.value]
            lines.append(f"[{colour}]{s.name}: {f.level.value}: {f.what}: {escape(f.text)}[/]")
        for error in (s.report or {}).get("errors") or []:
            lines.append(f"[dim]{s.name}:   {escape(error)}[/]")
    return lines


def rollup_line(statuses: Sequence[NodeStatus], seconds: float) -> str:
    counts = rollup(statuses)
    parts = [f"{counts[state.label]} {state.label}" for state in State]
    return f"{counts['nodes']} node(s): {', '.join(parts)} ({seconds:.1f} s)"


def node_json(s: NodeStatus) -> dict[str, Any]:
    r = s.report or {}
    images = [{**image, "fraction": round(fraction(image), 4)} for image in r.get("images") or []]
    answer = (r.get("apulld") or {}).get("answer") or {}
    config = s.config
    return {
        "name": s.name,
        "address": s.address,
        "state": s.state.label,
        "error": s.error or None,
        "findings": [f.as_json() for f in s.findings],
        "seconds": round(s.seconds, 3),
        "host": r.get("host"),
        "backend": answer.get("backend"),
        "backend_reasons": answer.get("reasons"),
        "apulld_version": answer.get("version"),
        "fs_ctl": r.get("fs_ctl"),
        "binaries": [
            {
                "name": b.name,
                "path": b.path,
                "installed": b.installed,
                "expected": b.expected,
                "current": b.current,
            }
            for b in s.binaries
        ],
        "services": r.get("services"),
        "containerd_plugin": (r.get("plugin") or {}).get("status"),
        "containerd_config": None
        if config is None
        else {
            "patched": config.patched,
            "edited": config.edited,
            "recorded": config.recorded,
            "drifted_keys": list(config.drifted_keys),
        },
        "cache": r.get("cache"),
        "images": images,
        "errors": r.get("errors"),
    }


def document(statuses: Sequence[NodeStatus], bundle: Bundle, seconds: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "bundle": {"version": bundle.version, "fingerprint": bundle.fingerprint},
        "summary": {**rollup(statuses), "seconds": round(seconds, 3)},
        "nodes": [node_json(s) for s in statuses],
    }
