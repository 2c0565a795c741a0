"""`python -m apull.bench.k8s` (`make bench-k8s`): the documents' DaemonSet test of the
benchmark's 1 GiB image on the lab's Kubernetes cluster, converted (lazy) against the
original (full), per node.

Before each DaemonSet every node is cold: the images, their snapshots, apulld's cache and
the page cache are gone (the bench's own `Target.cold`), so kubelet really pulls. kubelet's
pull time comes from its "Pulled" event; "Running after" is from the DaemonSet's creation
until the pod's container runs. The containers run the image's start script (which reads
what the application needs) and then sleep, so they stay Running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from apull.bench import big_image
from apull.bench.__main__ import prepare_image
from apull.bench.targets import NodeTarget, TargetError
from apull.config import default_config_path, load_config
from apull.image.convert import ConvertError
from apull.kube import daemonset_timing
from apull.kube.kubectl import Kubectl, KubeError
from apull.lab import layout
from apull.lab.registry import ensure_registry
from apull.lab.run import LabError
from apull.registry.client import RegistryError
from apull_node.image.format import DEFAULT_CHUNK_SIZE

console = Console(highlight=False)
#: Keeps the pod Running once the start script has read what it needs.
COMMAND = f"{big_image.START_PATH} && exec sleep 1000000"


def say(message: str) -> None:
    console.print(f"{time.strftime('%H:%M:%S')} {message}", markup=False)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m apull.bench.k8s", description=__doc__)
    p.add_argument("--runs", type=int, default=1, help="DaemonSets of each kind (default 1)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to Running (1800)")
    p.add_argument("--json", type=Path, default=Path("build/bench/k8s.json"), help="results file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    cfg = load_config(default_config_path())
    if cfg.target != "lab" or not cfg.lab_kubernetes or cfg.kubeconfig_path is None:
        console.print(
            f"{cfg.path}: the Kubernetes bench needs the lab's cluster (LAB_KUBERNETES=yes)"
        )
        return 2
    kube = Kubectl(cfg.kubeconfig_path)
    try:
        image = prepare_image(ensure_registry(), DEFAULT_CHUNK_SIZE)
    except (RegistryError, ConvertError, LabError, OSError) as err:
        console.print(f"[red]cannot prepare the benchmark image:[/] {err}")
        return 1
    registry = layout.guest_registry()
    refs = {
        "full": f"{registry}/{big_image.REPO}:{big_image.PLAIN_TAG}",
        "lazy": f"{registry}/{big_image.REPO}:{big_image.APULL_TAG}",
    }
    targets = [NodeTarget(layout.LabNode.from_name(n.name, n.lab_variant or "ondemand"))
               for n in cfg.nodes]  # fmt: skip
    say(f"image: {image.plain_bytes / 1e6:.0f} MB original, {image.apull_bytes / 1e6:.0f} MB "
        f"converted; nodes: {', '.join(t.name for t in targets)}")  # fmt: skip
    results: dict[str, list[dict[str, float | str | None]]] = {"full": [], "lazy": []}
    try:
        for run in range(1, args.runs + 1):
            for kind in ("full", "lazy"):
                say(f"run {run}/{args.runs}, {kind}: every node cold")
                for target in targets:
                    target.cold(list(refs.values()))
                timings = daemonset_timing.run(
                    kube, refs[kind], command=COMMAND, timeout=args.timeout, say=say
                )
                results[kind].extend(
                    {
                        "run": run,
                        "node": t.node,
                        "pull_s": t.pull_seconds,
                        "pull": t.pull_note,
                        "running_s": t.running_seconds,
                    }
                    for t in timings
                )
    except (TargetError, KubeError, daemonset_timing.DaemonSetTestError) as err:
        console.print(f"[red]benchmark failed:[/] {err}")
        return 1
    _render(results, image.plain_bytes, image.apull_bytes)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"refs": refs, "results": results}, indent=2) + "\n")
    console.print(f"results: {args.json}")
    return 0


def _render(
    results: dict[str, list[dict[str, float | str | None]]], plain_bytes: int, apull_bytes: int
) -> None:
    table = Table(
        title=f"DaemonSet of the 1 GiB image: original ({plain_bytes / 1e6:.0f} MB) "
        f"against converted ({apull_bytes / 1e6:.0f} MB), per node"
    )
    for column in ("run", "node", "pull full", "pull lazy", "Running full", "Running lazy"):
        table.add_column(column, justify="right")
    lazy = {(r["run"], r["node"]): r for r in results["lazy"]}
    for full in results["full"]:
        other = lazy.get((full["run"], full["node"]), {})

        def pull(row: dict[str, float | str | None]) -> str:
            value = row.get("pull_s")
            return f"{value:.2f} s" if isinstance(value, float) else str(row.get("pull", "-"))

        def running(row: dict[str, float | str | None]) -> str:
            value = row.get("running_s")
            return f"{value:.1f} s" if isinstance(value, float) else "-"

        table.add_row(str(full["run"]), str(full["node"]), pull(full), pull(other),
                      running(full), running(other))  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
