"""`python -m apull.bench` (`make bench`): see apull.bench.run for what is measured."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from apull.bench import big_image
from apull.bench.host_stack import StackError
from apull.bench.image_parts import ensure_converted
from apull.bench.measure import RegistryCpu, RegistryLog
from apull.bench.report import render
from apull.bench.run import ImageFacts, TargetResult, run_target, scratch_dir, write_json
from apull.bench.targets import HostTarget, NodeTarget, Target, TargetError, host_target
from apull.image.convert import ConvertError
from apull.lab import layout
from apull.lab.registry import access_log, ensure_registry, registry_dir
from apull.lab.run import LabError
from apull.registry.client import RegistryClient, RegistryError
from apull_node.image.format import DEFAULT_CHUNK_SIZE

console = Console(highlight=False)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m apull.bench", description=__doc__)
    p.add_argument("--runs", type=int, default=3, help="cold runs of each kind (default 3)")
    p.add_argument("--node", default="node2", help="lab node with fscache (default node2)")
    p.add_argument("--no-node", action="store_true", help="skip the lab node")
    p.add_argument("--no-host", action="store_true", help="skip this host (file backend)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"chunk size of the converted image (default {DEFAULT_CHUNK_SIZE})",
    )
    p.add_argument(
        "--json", type=Path, default=Path("build/bench/results.json"), help="results file"
    )
    return p.parse_args(argv)


def say(message: str) -> None:
    console.print(f"{time.strftime('%H:%M:%S')} {message}", markup=False)


def _image_bytes(client: RegistryClient, tag: str) -> tuple[int, list[str]]:
    manifest = client.manifest(big_image.REPO, tag)
    descriptors = [manifest["config"], *manifest["layers"]]
    return sum(int(d["size"]) for d in descriptors), [str(d["digest"]) for d in manifest["layers"]]


def prepare_image(client: RegistryClient, chunk_size: int) -> ImageFacts:
    big_image.ensure_pushed(client, say)
    tags = (big_image.PLAIN_TAG, big_image.APULL_TAG)
    ensure_converted(client, big_image.REPO, *tags, say, chunk_size=chunk_size)
    plain_bytes, _ = _image_bytes(client, big_image.PLAIN_TAG)
    apull_bytes, apull_layers = _image_bytes(client, big_image.APULL_TAG)
    # The layer with READ_FILE: the last library layer (after the busybox base).
    read_blob = apull_layers[len(big_image.LIBRARY_LAYERS)]
    return ImageFacts(plain_bytes, apull_bytes, big_image.FILES_BYTES, read_blob)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    if shutil.which("ctr") is None:
        console.print("ctr is missing: run `make deps` first")
        return 2
    try:
        client = ensure_registry()
        image = prepare_image(client, args.chunk_size)
    except (RegistryError, ConvertError, LabError, OSError) as err:
        console.print(f"[red]cannot prepare the benchmark image:[/] {err}")
        return 1
    log = RegistryLog(access_log(), big_image.REPO)
    registry = RegistryCpu(registry_dir() / "registry.pid")
    results: list[TargetResult] = []
    targets: list[tuple[Target, dict[str, str]]] = []
    host: HostTarget | None = None
    try:
        if not args.no_node:
            node = NodeTarget(layout.LabNode.from_name(args.node, "ondemand"))
            targets.append((node, _refs(layout.guest_registry())))
        if not args.no_host:
            apull = Path(sys.executable).with_name("apull")
            host = host_target(scratch_dir(), layout.host_registry(), [str(apull), "cri"])
            targets.append((host, _refs(layout.host_registry())))
        for target, refs in targets:
            say(f"{target.name} ({target.backend} backend): {args.runs} lazy and full runs")
            results.append(run_target(target, log, registry, refs, image, args.runs, say))
    except (TargetError, StackError, ValueError) as err:
        console.print(f"[red]benchmark failed:[/] {err}", markup=True)
        return 1
    finally:
        if host is not None:
            host.stack.stop()
            shutil.rmtree(host.stack.workdir, ignore_errors=True)
    render(console, image, results, args.runs)
    write_json(args.json, image, results)
    console.print(f"results: {args.json}")
    return 0


def _refs(registry: str) -> dict[str, str]:
    return {
        "plain": f"{registry}/{big_image.REPO}:{big_image.PLAIN_TAG}",
        "apull": f"{registry}/{big_image.REPO}:{big_image.APULL_TAG}",
    }


if __name__ == "__main__":
    sys.exit(main())
