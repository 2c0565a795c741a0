"""One measurement each: start to first output (lazy or full pull), a file read, an HTTP GET."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from apull.bench.big_image import READ_FILE, READY_LINE
from apull.bench.targets import Target, TargetError

# docker-registry's access log (combined format): "GET /v2/<repo>/blobs/<d> HTTP/1.1" 206 4096
_ACCESS = re.compile(
    r'"(?:GET|HEAD) /v2/(?P<repo>[^ ]+?)/(?:blobs|manifests)/[^ ]* [^"]*" \d+ (?P<bytes>\d+)'
)
_DD = re.compile(r"^(?P<bytes>\d+) bytes .* copied, (?P<seconds>[0-9.]+) s", re.MULTILINE)
#: `head -n 1 /proc/stat` on the target, marked: "CPUSTAT cpu  user nice system idle ...".
_CPUSTAT = re.compile(r"^CPUSTAT cpu +(?P<fields>[0-9 ]+)$", re.MULTILINE)
#: /proc/stat counts in USER_HZ, 100 on every Linux architecture that has containerd.
USER_HZ = 100


class RegistryLog:
    """Bytes the registry served for one repository, read from its access log."""

    def __init__(self, path: Path, repo: str) -> None:
        self.path = path
        self.repo = repo

    def offset(self) -> int:
        return self.path.stat().st_size

    def served_since(self, offset: int) -> int:
        with self.path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return sum(int(m["bytes"]) for m in _ACCESS.finditer(text) if m["repo"] == self.repo)


@dataclass(frozen=True)
class CpuUse:
    """CPU time spent while one read ran: a read through apulld costs more CPU per byte
    than a plain download (every chunk is checked, stored and handed to the kernel), so on
    a machine with few CPUs its speed is bounded by them; these figures show how close."""

    #: CPU seconds the target machine was busy (all its CPUs; includes the registry when
    #: the target is this host).
    busy_s: float
    #: CPU seconds it had: wall time x CPUs.
    capacity_s: float
    #: CPU seconds of the registry process (on this host) in the same span.
    registry_s: float


@dataclass(frozen=True)
class ReadRun:
    mb_s: float
    cpu: CpuUse


class RegistryCpu:
    """CPU seconds used so far by the registry process (it runs on this host)."""

    def __init__(self, pidfile: Path) -> None:
        self.pidfile = pidfile

    def seconds(self) -> float:
        pid = self.pidfile.read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / USER_HZ  # utime, stime


@dataclass(frozen=True)
class StartRun:
    #: From the start of the pull to the container's first output line.
    seconds: float
    #: The pull alone. For CRI pulls: the PullImage call, as kubelet makes it (our CLI's
    #: own Python start-up is not part of a pull); `wall_seconds` includes it.
    pull_seconds: float
    bytes_served: int
    wall_seconds: float


def start_to_first_output(
    target: Target, log: RegistryLog, ref: str, snapshotter: str, name: str
) -> StartRun:
    """Pull `ref` (CRI for apull, `ctr pull` for overlayfs) and run it; time its first line."""
    if snapshotter == "apull":
        pull = f"{target.cri()} pull --json {ref}"
    else:
        pull = f"{target.ctr} images pull --plain-http --snapshotter {snapshotter} {ref} >/dev/null"
    script = (
        "set -e\n"
        "t0=$(date +%s%N)\n"
        f"out=$({pull})\n"
        'echo "PULLED $t0 $(date +%s%N) $out"\n'
        f"{target.ctr} run --rm --snapshotter {snapshotter} {ref} {name} "
        '| { read -r line; echo "FIRST $(date +%s%N) $line"; cat >/dev/null; }\n'
    )
    offset = log.offset()
    process = target.stream(script)
    assert process.stdout is not None
    t0 = pulled = first = 0
    rpc = -1.0
    served = -1
    lines = []
    for line in process.stdout:
        lines.append(line)
        fields = line.split(maxsplit=3)
        if fields[:1] == ["PULLED"]:
            t0, pulled = int(fields[1]), int(fields[2])
            if len(fields) > 3:
                rpc = float(json.loads(fields[3])["seconds"])
        elif fields[:1] == ["FIRST"]:
            served = log.served_since(offset)
            first = int(fields[1])
            if fields[2:] != [READY_LINE]:
                raise TargetError(f"{target.name}: first output was {line!r}, not {READY_LINE}")
    _, err = process.communicate()
    if process.returncode != 0 or served < 0:
        raise TargetError(f"{target.name}: run of {ref} failed:\n{''.join(lines)}{err[-3000:]}")
    wall = (first - t0) / 1e9
    if rpc < 0:
        return StartRun(wall, (pulled - t0) / 1e9, served, wall)
    return StartRun(rpc + (first - pulled) / 1e9, rpc, served, wall)


def read_through_apulld(target: Target, registry: RegistryCpu) -> ReadRun:
    """MB/s of reading READ_FILE in full from its layer's EROFS mount (served by apulld),
    and the CPU time spent meanwhile."""
    before = registry.seconds()
    out = target.run(
        f"f=$(ls {target.snapshotter_root}/snapshots/*/fs/{READ_FILE} | head -n 1)\n"
        'test -n "$f"\n'
        'echo "CPUSTAT $(head -n 1 /proc/stat)"\n'
        'dd if="$f" of=/dev/null bs=1M 2>&1\n'
        'echo "CPUSTAT $(head -n 1 /proc/stat)"\n'
    )
    return ReadRun(_dd_rate(out), _cpu_use(out, registry.seconds() - before))


def http_download(target: Target, registry: RegistryCpu, repo: str, digest: str) -> ReadRun:
    """MB/s of a plain GET of the blob from the same registry, on the target, and the CPU
    time spent meanwhile."""
    before = registry.seconds()
    out = target.run(
        "python3 - <<'EOF'\n"
        "import http.client, time\n"
        "def stat():\n"
        "    with open('/proc/stat') as f:\n"
        "        print('CPUSTAT', f.readline().strip())\n"
        f"c = http.client.HTTPConnection({target.registry!r}, timeout=120)\n"
        "stat()\n"
        "t = time.monotonic()\n"
        f"c.request('GET', '/v2/{repo}/blobs/{digest}')\n"
        "r = c.getresponse()\n"
        "assert r.status == 200, r.status\n"
        "n = 0\n"
        "while chunk := r.read(1 << 20):\n"
        "    n += len(chunk)\n"
        "t = time.monotonic() - t\n"
        "stat()\n"
        "print('GOT', n, t)\n"
        "EOF\n"
    )
    got = re.search(r"^GOT (\d+) ([0-9.e-]+)$", out, re.MULTILINE)
    if got is None:
        raise TargetError(f"{target.name}: no download figures in: {out!r}")
    cpu = _cpu_use(out, registry.seconds() - before)
    return ReadRun(int(got[1]) / float(got[2]) / 1e6, cpu)


def _cpu_use(out: str, registry_s: float) -> CpuUse:
    """CPU time between the first and last CPUSTAT lines of `out` (the all-CPU line of
    /proc/stat: user nice system idle iowait irq softirq steal ...)."""
    stats = [[int(v) for v in m["fields"].split()] for m in _CPUSTAT.finditer(out)]
    if len(stats) < 2 or min(len(s) for s in stats) < 8:
        raise TargetError(f"no CPU figures in: {out!r}")
    delta = [b - a for a, b in zip(stats[0][:8], stats[-1][:8], strict=True)]
    idle = delta[3] + delta[4]
    busy = sum(delta) - idle
    return CpuUse(busy / USER_HZ, (busy + idle) / USER_HZ, registry_s)


def _dd_rate(out: str) -> float:
    match = _DD.search(out)
    if match is None:
        raise TargetError(f"no dd summary in: {out!r}")
    return int(match["bytes"]) / float(match["seconds"]) / 1e6


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
