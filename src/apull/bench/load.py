"""`make bench-load`: 20 containers of 5 converted images started at once on one target, cold.

On this host (file backend) and, with `--node`, on a lab node (fscache):

1. cold: images, content, snapshots, apulld's cache and the page cache gone;
2. single: one container of image 0 started alone (CRI pull, `ctr run`), timed from the
   start of its pull to its first output line and to its last (every data file read in
   full and its sha256 printed);
3. cold again, then load: the 5 images pulled through CRI at once, then `per_image`
   containers of each started at once (20 by default), each timed the same way.

Every container prints the sha256 of each data file; each is compared with the digest known
from the image's build: a wrong byte anywhere counts. While the load runs, apulld's peak RSS
(VmHWM) and its thread count are sampled on the target. The registry's access log gives the
requests and bytes per image: with every data file read in full by `per_image` readers at
once, bytes served / the image's converted data bytes is the fetches per chunk (1.0 when
concurrent readers of a chunk share one fetch).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from apull.bench import load_images
from apull.bench.host_stack import StackError
from apull.bench.image_parts import ensure_converted
from apull.bench.run import scratch_dir
from apull.bench.targets import HostTarget, NodeTarget, Target, TargetError, host_target
from apull.image.convert import ConvertError
from apull.lab import layout
from apull.lab.registry import access_log, ensure_registry
from apull.lab.run import LabError
from apull.registry.client import RegistryClient, RegistryError

console = Console(highlight=False)
#: "GET /v2/<repo>/blobs/sha256:<hex> HTTP/1.1" <status> <bytes>
_BLOB_GET = re.compile(r'"GET /v2/(?P<repo>[^ ]+?)/blobs/(?P<digest>sha256:[0-9a-f]{64}) [^"]*" '
                       r"(?P<status>\d+) (?P<bytes>\d+)")  # fmt: skip
_STATUS = re.compile(r"^(VmHWM|VmRSS|Threads):\s+(\d+)", re.MULTILINE)


def say(message: str) -> None:
    console.print(f"{time.strftime('%H:%M:%S')} {message}", markup=False)


@dataclass
class Start:
    """One container: seconds from the start of its pull (or of its run, when the images
    were pulled before) to its first line and to its last; the digests it printed."""

    image: int
    first_s: float = float("nan")
    done_s: float = float("nan")
    digests: dict[str, str] = field(default_factory=dict)
    error: str = ""

    def wrong(self) -> list[str]:
        want = load_images.expected_digests(self.image)
        return sorted(n for n in want if self.digests.get(n) != want[n])


@dataclass
class ImageTraffic:
    #: GETs of the image's blobs; bytes served of its data layer, and that layer's size.
    requests: int
    bytes_served: int
    data_bytes: int

    @property
    def fetches_per_chunk(self) -> float:
        return self.bytes_served / self.data_bytes if self.data_bytes else float("nan")


@dataclass
class LoadResult:
    target: str
    backend: str
    single: Start
    pull_s: float
    starts: list[Start]
    apulld_peak_rss_kib: int
    apulld_peak_threads: int
    traffic: dict[str, ImageTraffic]

    def summary(self) -> dict[str, float]:
        firsts = [s.first_s for s in self.starts if not s.error]
        dones = [s.done_s for s in self.starts if not s.error]
        per_chunk = [t.fetches_per_chunk for t in self.traffic.values()]
        return {
            "containers": len(self.starts),
            "failed_starts": sum(1 for s in self.starts if s.error),
            "wrong_files": sum(len(s.wrong()) for s in self.starts if not s.error),
            "single_first_s": self.single.first_s,
            "single_done_s": self.single.done_s,
            "pull_5_images_s": self.pull_s,
            "first_p50_s": percentile(firsts, 50),
            "first_p99_s": percentile(firsts, 99),
            "done_p50_s": percentile(dones, 50),
            "done_p99_s": percentile(dones, 99),
            "apulld_peak_rss_mib": self.apulld_peak_rss_kib / 1024,
            "apulld_peak_threads": self.apulld_peak_threads,
            "registry_requests_per_image": statistics.median(
                [t.requests for t in self.traffic.values()]
            ),
            "fetches_per_chunk_max": max(per_chunk) if per_chunk else float("nan"),
        }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 20 values is the largest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def _container_script(target: Target, ref: str, name: str, pull: bool) -> str:
    steps = ["set -e", "t0=$(date +%s%N)"]  # run in a subshell: one line each
    if pull:
        steps.append(f"{target.cri()} pull {ref} >/dev/null")
    steps.append(
        f"{target.ctr} run --rm --snapshotter apull {ref} {name} "
        '| while IFS= read -r line; do echo "LINE $(date +%s%N) $line"; done'
    )
    steps.append('echo "T0 $t0"')
    return "\n".join(steps) + "\n"


def _parse(start: Start, output: str) -> None:
    t0 = 0
    lines: list[tuple[int, str]] = []
    for row in output.splitlines():
        fields = row.split(" ", 2)
        if fields[0] == "T0":
            t0 = int(fields[1])
        elif fields[0] == "LINE" and len(fields) == 3:
            lines.append((int(fields[1]), fields[2]))
    if not t0 or not lines or lines[0][1] != load_images.FIRST_LINE:
        start.error = f"no first line {load_images.FIRST_LINE!r}: {output[-500:]!r}"
        return
    start.first_s = (lines[0][0] - t0) / 1e9
    start.done_s = (lines[-1][0] - t0) / 1e9
    for _, text in lines[1:]:
        parts = text.split()
        if len(parts) == 2:
            start.digests[parts[1]] = parts[0]


#: Marks each container's files in the combined output of one run.
_PART = re.compile(r"^=== (?P<i>\d+) (?P<what>out|err|rc)$", re.MULTILINE)


def run_containers(
    target: Target, refs: list[tuple[int, str]], pull: bool, tag: str
) -> list[Start]:
    """Start one container per (image, ref) at once, from one script on the target (one
    SSH session, not one per container: sshd refuses more than MaxSessions per
    connection); wait for all. Each container's output, errors and exit status come back
    marked."""
    jobs = []
    for i, (_, ref) in enumerate(refs):
        body = _container_script(target, ref, f"load-{tag}-{i}", pull)
        jobs.append(f'{{ ( {body} ) >"$d/{i}.out" 2>"$d/{i}.err"; echo $? >"$d/{i}.rc"; }} &')
    report = [f'for f in out err rc; do echo "=== {i} $f"; cat "$d/{i}.$f"; done'
              for i in range(len(refs))]  # fmt: skip
    script = "\n".join(["d=$(mktemp -d)", *jobs, "wait", *report, 'rm -rf "$d"']) + "\n"
    output = target.run(script, timeout=1800)
    parts: dict[tuple[int, str], str] = {}
    marks = list(_PART.finditer(output))
    for mark, after in zip(marks, [*marks[1:], None], strict=True):
        body = output[mark.end() + 1 : after.start() if after else len(output)]
        parts[(int(mark["i"]), mark["what"])] = body
    starts = []
    for i, (image, _) in enumerate(refs):
        start = Start(image)
        rc, err = parts.get((i, "rc"), "").strip(), parts.get((i, "err"), "").strip()
        if rc != "0":
            start.error = f"exit {rc or '?'}: {err[-500:]}"
        else:
            _parse(start, parts.get((i, "out"), ""))
            if start.error and err:
                start.error += f"; stderr: {err[-500:]}"
        starts.append(start)
    return starts


class ApulldSampler:
    """apulld's VmHWM and Threads on the target, every 0.2 s, while it runs."""

    def __init__(self, target: Target, pid_command: str) -> None:
        self.peak_rss = 0
        self.peak_threads = 0
        script = (
            f"pid=$({pid_command})\n"
            "while test -e /proc/$pid/status; do cat /proc/$pid/status; sleep 0.2; done\n"
        )
        self.process = target.stream(script)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = _STATUS.match(line)
            if match is None:
                continue
            value = int(match[2])
            if match[1] == "VmHWM":
                self.peak_rss = max(self.peak_rss, value)
            elif match[1] == "Threads":
                self.peak_threads = max(self.peak_threads, value)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.thread.join(5)


@dataclass(frozen=True)
class Converted:
    """A converted image's blobs as the registry has them."""

    blobs: tuple[str, ...]
    data_blob: str
    data_bytes: int


def traffic(log: Path, offset: int, images: dict[int, Converted]) -> dict[str, ImageTraffic]:
    """Per image since `offset`: GETs of its blobs, bytes served of its data layer."""
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    owner = {digest: i for i, image in images.items() for digest in image.blobs}
    found = {i: ImageTraffic(0, 0, image.data_bytes) for i, image in images.items()}
    for match in _BLOB_GET.finditer(text):
        index = owner.get(match["digest"])
        if match["repo"] != load_images.REPO or index is None:
            continue
        found[index].requests += 1
        if match["digest"] == images[index].data_blob:
            found[index].bytes_served += int(match["bytes"])
    return {f"img{i}": t for i, t in sorted(found.items())}


def prepare(client: RegistryClient) -> dict[int, Converted]:
    """Each image pushed and converted; what the converted images are made of."""
    data: dict[int, Converted] = {}
    for index in range(load_images.IMAGES):
        load_images.ensure_pushed(client, index)
        tags = (load_images.plain_tag(index), load_images.apull_tag(index))
        ensure_converted(client, load_images.REPO, *tags, say)
        manifest = client.manifest(load_images.REPO, load_images.apull_tag(index))
        layers = manifest["layers"]  # base, data, app
        blobs = tuple(str(d["digest"]) for d in [manifest["config"], *layers])
        data[index] = Converted(blobs, str(layers[1]["digest"]), int(layers[1]["size"]))
    return data


def run_load(
    target: Target,
    registry: str,
    data: dict[int, Converted],
    per_image: int,
    pid_command: str,
) -> LoadResult:
    refs = {i: f"{registry}/{load_images.REPO}:{load_images.apull_tag(i)}" for i in data}
    everything = list(refs.values())
    target.cold(everything)
    [single] = run_containers(target, [(0, refs[0])], pull=True, tag="single")
    if single.error:
        raise TargetError(f"{target.name}: the single start failed: {single.error}")
    say(
        f"{target.name}: single start: first output {single.first_s:.2f} s, "
        f"done {single.done_s:.2f} s"
    )
    target.cold(everything)
    log = access_log()
    offset = log.stat().st_size
    sampler = ApulldSampler(target, pid_command)
    try:
        started = time.monotonic()
        # every pull at once; the script fails if one did
        pulls = [f"{target.cri()} pull {r} >/dev/null & p{i}=$!" for i, r in enumerate(everything)]
        waits = [f"wait $p{i} || {{ echo 'pull of {r} failed' >&2; exit 1; }}"
                 for i, r in enumerate(everything)]  # fmt: skip
        target.run("\n".join(pulls + waits) + "\n")
        pull_s = time.monotonic() - started
        wanted = [(i, refs[i]) for i in data for _ in range(per_image)]
        starts = run_containers(target, wanted, pull=False, tag="load")
    finally:
        sampler.stop()
    seen = traffic(log, offset, data)
    target.remove_images(everything)
    return LoadResult(target.name, target.backend, single, pull_s, starts,
                      sampler.peak_rss, sampler.peak_threads, seen)  # fmt: skip


def render(results: list[LoadResult]) -> None:
    table = Table(title="20 starts of 5 converted images at once, cold")
    table.add_column("figure")
    for r in results:
        table.add_column(f"{r.target} ({r.backend})", justify="right")
    rows = [
        ("containers", "{:.0f}"),
        ("failed_starts", "{:.0f}"),
        ("wrong_files", "{:.0f}"),
        ("single_first_s", "{:.2f}"),
        ("first_p50_s", "{:.2f}"),
        ("first_p99_s", "{:.2f}"),
        ("single_done_s", "{:.2f}"),
        ("done_p50_s", "{:.2f}"),
        ("done_p99_s", "{:.2f}"),
        ("pull_5_images_s", "{:.2f}"),
        ("apulld_peak_rss_mib", "{:.1f}"),
        ("apulld_peak_threads", "{:.0f}"),
        ("registry_requests_per_image", "{:.0f}"),
        ("fetches_per_chunk_max", "{:.2f}"),
    ]
    summaries = [r.summary() for r in results]
    for key, fmt in rows:
        table.add_row(key, *(fmt.format(s[key]) for s in summaries))
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apull.bench.load", description=__doc__)
    p.add_argument("--per-image", type=int, default=4, help="containers per image (default 4)")
    p.add_argument("--node", default="", help="also on this lab node (fscache), e.g. node2")
    p.add_argument("--no-host", action="store_true", help="skip this host (file backend)")
    p.add_argument("--json", type=Path, default=Path("build/bench/load.json"))
    args = p.parse_args(argv)
    try:
        client = ensure_registry()
        data = prepare(client)
    except (RegistryError, ConvertError, LabError, OSError) as err:
        console.print(f"cannot prepare the load images: {err}", markup=False)
        return 1
    results: list[LoadResult] = []
    host: HostTarget | None = None
    try:
        if args.node:
            node = NodeTarget(layout.LabNode.from_name(args.node, "ondemand"))
            pid = "systemctl show -p MainPID --value apulld"
            results.append(run_load(node, layout.guest_registry(), data, args.per_image, pid))
        if not args.no_host:
            apull = Path(sys.executable).with_name("apull")
            host = host_target(scratch_dir(), layout.host_registry(), [str(apull), "cri"])
            pid = f"pgrep -f -o 'apull_node.daemon --config {host.stack.config}'"
            results.append(run_load(host, layout.host_registry(), data, args.per_image, pid))
    except (TargetError, StackError, ValueError) as err:
        console.print(f"load benchmark failed: {err}", markup=False)
        return 1
    finally:
        if host is not None:
            host.stack.stop()
            shutil.rmtree(host.stack.workdir, ignore_errors=True)
    render(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = [{**asdict(r), "summary": r.summary()} for r in results]
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"results: {args.json}")
    failed = any(r.summary()["failed_starts"] or r.summary()["wrong_files"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
