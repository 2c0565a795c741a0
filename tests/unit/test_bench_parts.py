"""The benchmark's own parts: the image generator and the readers of logs and dd output."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest

from apull.bench import big_image, image_parts
from apull.bench.measure import RegistryCpu, RegistryLog, _cpu_use, _dd_rate
from apull.bench.targets import TargetError, _quote

LINES = [
    '127.0.0.1 - - [23/Nov/2026:21:28:56 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "Go-http-client/1.1"',
    '127.0.0.1 - - [23/Nov/2026:21:28:57 +0000] "GET /v2/lab/bench-big/blobs/sha256:'
    + "a" * 64
    + ' HTTP/1.1" 206 1048576 "" "apulld/0.1"',
    'time="2026-11-23T21:28:57.7Z" level=info msg="response completed" http.response.written=9',
    '127.0.0.1 - - [23/Nov/2026:21:28:58 +0000] "GET /v2/lab/busybox/blobs/sha256:'
    + "b" * 64
    + ' HTTP/1.1" 200 4096 "" "containerd/1.6.20"',
    '127.0.0.1 - - [23/Nov/2026:21:28:58 +0000] "HEAD /v2/lab/bench-big/manifests/apull-v1 '
    'HTTP/1.1" 200 1234 "" "containerd/1.6.20"',
]


def test_registry_log_counts_one_repository_after_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "registry.log"
    path.write_text(LINES[0] + "\n")
    log = RegistryLog(path, "lab/bench-big")
    offset = log.offset()
    with path.open("a") as out:
        out.write("\n".join(LINES[1:]) + "\n")
    # The busybox line, the structured line and the line before the offset do not count.
    assert log.served_since(offset) == 1048576 + 1234
    assert log.served_since(log.offset()) == 0


def test_dd_rate_reads_gnu_dd_summary() -> None:
    out = (
        "256+0 records in\n256+0 records out\n"
        "268435456 bytes (268 MB, 256 MiB) copied, 0.5 s, 537 MB/s\n"
    )
    assert _dd_rate(out) == pytest.approx(268435456 / 0.5 / 1e6)
    with pytest.raises(TargetError):
        _dd_rate("dd: failed to open 'x': No such file or directory\n")


def test_cpu_use_counts_busy_and_idle_between_the_first_and_last_stat_lines() -> None:
    out = (
        "CPUSTAT cpu  1000 10 500 9000 100 5 20 3 0 0\n"
        "268435456 bytes (268 MB, 256 MiB) copied, 0.5 s, 537 MB/s\n"
        "CPUSTAT cpu  1060 10 520 9030 110 6 22 4 0 0\n"
    )
    use = _cpu_use(out, 0.25)
    # busy: user 60 + system 20 + irq 1 + softirq 2 + steal 1; idle 30 + iowait 10.
    assert use.busy_s == pytest.approx(0.84)
    assert use.capacity_s == pytest.approx(1.24)
    assert use.registry_s == 0.25
    with pytest.raises(TargetError):
        _cpu_use("CPUSTAT cpu  1 2 3 4 5 6 7 8\n", 0.0)


def test_registry_cpu_reads_the_process_named_by_the_pid_file(tmp_path: Path) -> None:
    pidfile = tmp_path / "registry.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    before = RegistryCpu(pidfile).seconds()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # this process stands in for the registry
        pass
    assert RegistryCpu(pidfile).seconds() - before >= 0.1
    pidfile.write_text("999999999\n")
    with pytest.raises(FileNotFoundError):
        RegistryCpu(pidfile).seconds()


def test_quote_survives_single_quotes() -> None:
    assert _quote("echo 'a b'") == "'echo '\"'\"'a b'\"'\"''"


def test_content_is_deterministic_and_half_compressible() -> None:
    a = image_parts.generated_content("opt/x.so", 1 << 20)
    assert a == image_parts.generated_content("opt/x.so", 1 << 20)
    assert a != image_parts.generated_content("opt/y.so", 1 << 20)
    ratio = len(gzip.compress(a, 1)) / len(a)
    assert 0.4 < ratio < 0.65


def test_app_layer_is_reproducible_and_has_the_entrypoint() -> None:
    raw1, blob1 = big_image.tar_layer(big_image._app)
    raw2, blob2 = big_image.tar_layer(big_image._app)
    assert blob1.digest == blob2.digest and raw1 == raw2
    assert big_image.READY_LINE.encode() in raw1
    assert b"bench/start.sh" in raw1


def test_the_image_holds_over_a_gibibyte_of_files() -> None:
    total = sum(size for _, files in big_image.LIBRARY_LAYERS for _, size in files)
    assert total >= 1 << 30
    names = [path for _, files in big_image.LIBRARY_LAYERS for path, _ in files]
    assert big_image.READ_FILE in names
    assert big_image.READ_FILE not in big_image.START_SCRIPT
