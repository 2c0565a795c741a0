"""`make bench`: lazy (apull) vs full (overlayfs) pulls of a 1 GiB image, on a node and here.

For each target, `runs` cold runs of each kind (images, content and snapshots removed,
apulld and the snapshotter restarted with their caches wiped, page cache dropped):

- lazy: CRI pull of the converted image (remote snapshots), `ctr run` of its entrypoint;
  then the large file it never touched is read in full through apulld (cold), the page
  cache dropped and read again (warm: apulld's cache or cachefiles'), and the layer blob
  downloaded with a plain HTTP GET from the same registry for comparison;
- full: `ctr images pull` of the original image into overlayfs, `ctr run`.

Times come from the target's clock; bytes from the registry's access log, read the moment
the first output line reaches us.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from apull.bench import big_image
from apull.bench.measure import (
    CpuUse,
    RegistryCpu,
    RegistryLog,
    StartRun,
    http_download,
    median,
    read_through_apulld,
    start_to_first_output,
)
from apull.bench.targets import Target


@dataclass(frozen=True)
class ImageFacts:
    plain_bytes: int
    apull_bytes: int
    files_bytes: int
    read_blob: str


@dataclass
class TargetResult:
    name: str
    backend: str
    lazy: list[StartRun] = field(default_factory=list)
    full: list[StartRun] = field(default_factory=list)
    cold_read: list[float] = field(default_factory=list)
    warm_read: list[float] = field(default_factory=list)
    http: list[float] = field(default_factory=list)
    #: CPU time during each cold read and each HTTP GET (see measure.CpuUse).
    cold_read_cpu: list[CpuUse] = field(default_factory=list)
    http_cpu: list[CpuUse] = field(default_factory=list)

    def summary(self, image: ImageFacts) -> dict[str, float]:
        lazy_s = median([r.seconds for r in self.lazy])
        full_s = median([r.seconds for r in self.full])
        lazy_b = median([float(r.bytes_served) for r in self.lazy])
        full_b = median([float(r.bytes_served) for r in self.full])
        cold = median(self.cold_read)
        http = median(self.http)
        return {
            "lazy_first_output_s": lazy_s,
            "full_first_output_s": full_s,
            "speedup": full_s / lazy_s if lazy_s else float("nan"),
            "lazy_bytes": lazy_b,
            "full_bytes": full_b,
            # Of the image as it is served lazily (the EROFS blobs: the files, ~1:1).
            "lazy_bytes_pct_of_image": 100.0 * lazy_b / image.apull_bytes,
            "lazy_bytes_vs_full": lazy_b / full_b if full_b else float("nan"),
            "cold_read_mb_s": cold,
            "http_mb_s": http,
            # Per run (the read and the GET back to back), then the median: the two
            # medians' quotient would mix runs of a loaded machine.
            "cold_vs_http": median([c / h for c, h in zip(self.cold_read, self.http, strict=True)]),
            "warm_read_mb_s": median(self.warm_read),
            **_cpu_summary("cold_read", self.cold_read_cpu),
            **_cpu_summary("http", self.http_cpu),
        }


def _cpu_summary(what: str, uses: list[CpuUse]) -> dict[str, float]:
    return {
        f"{what}_cpu_busy_s": median([u.busy_s for u in uses]),
        f"{what}_cpu_capacity_s": median([u.capacity_s for u in uses]),
        f"{what}_registry_cpu_s": median([u.registry_s for u in uses]),
    }


def run_target(
    target: Target,
    log: RegistryLog,
    registry: RegistryCpu,
    refs: dict[str, str],
    image: ImageFacts,
    runs: int,
    say: Callable[[str], None],
) -> TargetResult:
    result = TargetResult(target.name, target.backend)
    everything = [refs["apull"], refs["plain"]]
    for i in range(runs):
        target.cold(everything)
        run = start_to_first_output(target, log, refs["apull"], "apull", f"bench-lazy-{i}")
        result.lazy.append(run)
        cold = read_through_apulld(target, registry)
        result.cold_read.append(cold.mb_s)
        result.cold_read_cpu.append(cold.cpu)
        target.drop_page_cache()
        result.warm_read.append(read_through_apulld(target, registry).mb_s)
        http = http_download(target, registry, big_image.REPO, image.read_blob)
        result.http.append(http.mb_s)
        result.http_cpu.append(http.cpu)
        say(
            f"{target.name} lazy #{i + 1}: first output {run.seconds:.2f}s (pull "
            f"{run.pull_seconds:.2f}s), {run.bytes_served / 1e6:.2f} MB served; read cold "
            f"{result.cold_read[-1]:.0f} MB/s, warm {result.warm_read[-1]:.0f} MB/s, "
            f"HTTP {result.http[-1]:.0f} MB/s; CPU busy cold read {cold.cpu.busy_s:.2f} of "
            f"{cold.cpu.capacity_s:.2f} s (registry {cold.cpu.registry_s:.2f}), HTTP "
            f"{http.cpu.busy_s:.2f} of {http.cpu.capacity_s:.2f} s (registry "
            f"{http.cpu.registry_s:.2f})"
        )
    for i in range(runs):
        target.cold(everything)
        run = start_to_first_output(target, log, refs["plain"], "overlayfs", f"bench-full-{i}")
        result.full.append(run)
        say(
            f"{target.name} full #{i + 1}: first output {run.seconds:.2f}s (pull "
            f"{run.pull_seconds:.2f}s), {run.bytes_served / 1e6:.1f} MB served"
        )
    target.remove_images(everything)
    return result


def write_json(path: Path, image: ImageFacts, results: list[TargetResult]) -> None:
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image": asdict(image),
        "targets": [{**asdict(r), "summary": r.summary(image)} for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="apull-bench-", dir="/var/tmp"))
