"""The bundle's artefacts for this machine's platform start under its own /usr/bin/python3.

`make unit-py39` mounts the controller's bundle read-only here (APULL_TEST_BUNDLE) and runs
this inside Debian 11 (glibc 2.31, python3.9): the artefacts a python3 3.9 node would get,
chosen from the manifest as the installers choose them. Elsewhere it is skipped (the
controller's own tests run the host's artefacts: tests/unit/test_bundle.py).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

BUNDLE = os.environ.get("APULL_TEST_BUNDLE", "")
pytestmark = pytest.mark.skipif(not BUNDLE, reason="APULL_TEST_BUNDLE names no bundle")


def system_python() -> str:
    run = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return run.stdout.strip()


def artefact(name: str) -> Path:
    """The one artefact of `name` that serves this machine (as Bundle.for_node picks it)."""
    manifest: dict[str, Any] = json.loads((Path(BUNDLE) / "manifest.json").read_text())
    python, arch = system_python(), platform.machine()
    glibc = tuple(int(p) for p in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split("."))
    fits = [
        b
        for b in manifest["binaries"]
        if b["name"] == name
        and arch in b["serves"]["arches"]
        and python in b["serves"]["pythons"]
        and glibc >= tuple(int(p) for p in b["serves"]["glibc_min"].split("."))
    ]
    assert len(fits) == 1, fits
    return Path(BUNDLE) / fits[0]["platform"] / name


@pytest.mark.parametrize("name", ["apulld", "apull-containerd-grpc"])
def test_the_artefact_for_this_platform_starts(name: str, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "APULL_RUNTIME_DIR": str(tmp_path / "runtime")}
    binary = artefact(name)
    for attempt in ("first start (unpacks)", "second start"):
        started = time.monotonic()
        run = subprocess.run([str(binary), "--help"], env=env, capture_output=True, text=True)
        took = time.monotonic() - started
        assert run.returncode == 0, run.stderr
        assert "--config" in run.stdout
        print(f"{binary.parent.name}/{name} --help, {attempt}: {took:.2f} s")


def test_the_snapshotters_cri_client_runs(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "APULL_RUNTIME_DIR": str(tmp_path / "runtime")}
    missing = tmp_path / "no-containerd.sock"
    run = subprocess.run(
        [str(artefact("apull-containerd-grpc")), "cri", "--address", str(missing), "ls"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 1
    assert f"cannot reach containerd on {missing}" in run.stderr
