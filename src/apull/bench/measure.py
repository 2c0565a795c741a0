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


def read_through_apulld(target: Target) -> float:
    """MB/s of reading READ_FILE in full from its layer's EROFS mount (served by apulld)."""
    out = target.run(
        f"f=$(ls {target.snapshotter_root}/snapshots/*/fs/{READ_FILE} | head -n 1)\n"
        'test -n "$f"\n'
        'dd if="$f" of=/dev/null bs=1M 2>&1\n'
    )
    return _dd_rate(out)


def http_download(target: Target, repo: str, digest: str) -> float:
    """MB/s of a plain GET of the blob from the same registry, on the target."""
    out = target.run(
        "python3 - <<'EOF'\n"
        "import http.client, time\n"
        f"c = http.client.HTTPConnection({target.registry!r}, timeout=120)\n"
        "t = time.monotonic()\n"
        f"c.request('GET', '/v2/{repo}/blobs/{digest}')\n"
        "r = c.getresponse()\n"
        "assert r.status == 200, r.status\n"
        "n = 0\n"
        "while chunk := r.read(1 << 20):\n"
        "    n += len(chunk)\n"
        "print(n, time.monotonic() - t)\n"
        "EOF\n"
    )
    size, seconds = out.split()
    return int(size) / float(seconds) / 1e6


def _dd_rate(out: str) -> float:
    match = _DD.search(out)
    if match is None:
        raise TargetError(f"no dd summary in: {out!r}")
    return int(match["bytes"]) / float(match["seconds"]) / 1e6


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
