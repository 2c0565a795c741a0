"""The load benchmark's parts without a target: its images carry the files whose digests
the containers must print, a container's output is read into times and digests (a wrong
digest is caught), percentiles are nearest-rank, and the access log is split per image."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from apull.bench import load, load_images
from apull.bench.targets import Target


def test_an_images_data_layer_holds_the_files_its_digests_name() -> None:
    image = load_images.build(2)
    assert len(image.layers) == 3  # busybox base, data, app
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(image.layers[1].data))) as tar:
        found = {
            Path(m.name).name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    assert found == load_images.expected_digests(2)
    assert load_images.expected_digests(2) != load_images.expected_digests(3)
    assert load_images.build(2).layers[1].digest == image.layers[1].digest  # reproducible


def _output(index: int, wrong: str = "") -> str:
    lines = ["LINE 1500000000 " + load_images.FIRST_LINE]
    for n, (name, digest) in enumerate(sorted(load_images.expected_digests(index).items())):
        shown = "0" * 64 if name == wrong else digest
        lines.append(f"LINE {2000000000 + n * 1000000000} {shown}  {name}")
    return "\n".join([*lines, "T0 1000000000"]) + "\n"


def test_a_containers_output_gives_its_times_and_catches_a_wrong_digest() -> None:
    good = load.Start(1)
    load._parse(good, _output(1))
    assert (good.first_s, good.done_s, good.error) == (0.5, 4.0, "")
    assert good.wrong() == []
    name = load_images.file_names(1)[2]
    bad = load.Start(1)
    load._parse(bad, _output(1, wrong=name))
    assert bad.wrong() == [name]
    silent = load.Start(1)
    load._parse(silent, "T0 1000000000\n")
    assert silent.error.startswith("no first line")


@pytest.mark.parametrize(("pct", "value"), [(50, 10.0), (99, 20.0), (100, 20.0), (1, 1.0)])
def test_nearest_rank_percentiles(pct: float, value: float) -> None:
    assert load.percentile([float(v) for v in range(1, 21)], pct) == value


def test_the_access_log_is_split_per_image(tmp_path: Path) -> None:
    d = {k: "sha256:" + hashlib.sha256(k.encode()).hexdigest() for k in ("a0", "a1", "b1")}
    images = {0: load.Converted((d["a0"], d["a1"]), d["a1"], 1000),
              1: load.Converted((d["b1"],), d["b1"], 500)}  # fmt: skip
    log = tmp_path / "access.log"
    log.write_text("old line\n")
    offset = log.stat().st_size

    def get(digest: str, size: int, repo: str = load_images.REPO) -> str:
        return f'1.2.3.4 - - [x] "GET /v2/{repo}/blobs/{digest} HTTP/1.1" 206 {size} "-" "apulld"\n'

    with log.open("a") as out:
        out.write(get(d["a0"], 10) + get(d["a1"], 600) + get(d["a1"], 400) + get(d["b1"], 500))
        out.write(get(d["b1"], 999, repo="lab/other"))
    seen = load.traffic(log, offset, images)
    assert (seen["img0"].requests, seen["img0"].bytes_served) == (3, 1000)
    assert seen["img0"].fetches_per_chunk == 1.0
    assert (seen["img1"].requests, seen["img1"].fetches_per_chunk) == (1, 1.0)


class LocalShell(Target):
    """Runs the harness's scripts with sh here; its `ctr` is a STAND-IN script (this test is
    about the harness: one script starts every container and their outputs come back apart),
    so it runs nothing: `ctr run ... REF NAME` prints what image 0's entrypoint prints, or
    fails for a REF ending in `bad`."""

    name = "local"
    backend = "none"
    registry = "registry.invalid"
    snapshotter_root = "/nonexistent"

    def __init__(self, tmp_path: Path) -> None:
        lines = [load_images.FIRST_LINE] + [
            f"{d}  {n}" for n, d in sorted(load_images.expected_digests(0).items())
        ]
        stand_in = tmp_path / "ctr"
        stand_in.write_text(
            "#!/bin/sh\n"
            "for a; do ref=$name; name=$a; done\n"
            'case "$ref" in *bad) echo "ctr: image not found: $ref" >&2; exit 3;; esac\n'
            + "".join(f"echo '{line}'\n" for line in lines)
        )
        stand_in.chmod(0o755)
        self.ctr = str(stand_in)

    def command(self, script: str) -> list[str]:
        return ["sh", "-c", script]

    def cri(self) -> str:
        return "true"

    def wipe_daemon_caches(self) -> None:
        pass


def test_one_script_starts_every_container_and_their_outputs_come_back_apart(
    tmp_path: Path,
) -> None:
    refs = [(0, "r/img0"), (0, "r/img0"), (0, "r/bad"), (0, "r/img0")]
    starts = load.run_containers(LocalShell(tmp_path), refs, pull=True, tag="t")
    assert [bool(s.error) for s in starts] == [False, False, True, False]
    assert all(s.wrong() == [] and 0 <= s.first_s <= s.done_s for s in starts if not s.error)
    assert "ctr: image not found: r/bad" in starts[2].error
