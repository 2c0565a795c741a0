"""The node tests under the nodes' oldest python3: Debian 11's python3.9 in a build root.

`python -m apull.lab.py39_root [PYTEST ARGS]` (`make unit-py39`):

1. debootstraps Debian 11 `bullseye` (glibc 2.31, python3.9), once, into the lab cache;
2. installs what the tests need for CPython 3.9 on this architecture into it (`pip
   --target`, no dependency resolution: tests/node/requirements-py39.txt plus the bundled
   runtime's versions from this venv), once per set of pins;
3. runs pytest on tests/node in it, in a private mount namespace, with the checkout mounted
   read-only at /apull, the bundle (built if stale) at /bundle for the tests that start its
   artefacts, and the host's /proc, /sys and /dev.

Only apull_node and its bundled dependencies exist in there: a test that reaches for the
controller's package fails to import, which is the point.
"""

from __future__ import annotations

import hashlib
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from apull.bundle.builder import NATIVE_DEPENDENCIES, PURE_DEPENDENCIES, ensure_bundle
from apull.lab import layout
from apull.lab.image import debian_mirror
from apull.lab.run import LabError, Log, run_logged
from apull.paths import suite_root

SUITE = "bullseye"
PACKAGES = "python3"
PYTHON = "3.9"
#: Where the test dependencies go inside the root.
DEPS = "/opt/apull-test"
REQUIREMENTS = Path("tests/node/requirements-py39.txt")


def _say(text: str) -> None:
    print(f"py39: {text}", flush=True)


def ensure_root(log: Log = _say) -> Path:
    """Debian 11 with python3, debootstrapped once into the lab cache."""
    cache = layout.cache_dir()
    root = cache / f"{SUITE}-root"
    stamp = root / ".apull-packages"
    if stamp.exists() and stamp.read_text() == PACKAGES:
        return root
    tmp = cache / f"{SUITE}-root.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    logfile = cache / f"{SUITE}-root.log"
    log(f"debootstrap {SUITE} (python3.9, glibc 2.31) into {root} (about a minute, once)")
    run_logged(
        ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, tmp, debian_mirror()],
        logfile,
        f"debootstrap {SUITE}",
    )
    run_logged(["chroot", tmp, "apt-get", "clean"], logfile, "apt-get clean")
    (tmp / ".apull-packages").write_text(PACKAGES)
    tmp.rename(root)
    return root


def _pins() -> list[str]:
    lines = (suite_root() / REQUIREMENTS).read_text().splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    bundled = [*NATIVE_DEPENDENCIES, *PURE_DEPENDENCIES]
    return pins + [f"{d}=={metadata.version(d)}" for d in bundled]


def ensure_deps(root: Path, log: Log = _say) -> None:
    """The tests' dependencies for CPython 3.9 on this machine's architecture, in the root."""
    pins = _pins()
    arch = platform.machine()
    key = hashlib.sha256("\n".join([arch, *pins]).encode()).hexdigest()
    target = root / DEPS.lstrip("/")
    stamp = target / ".apull-pins"
    if stamp.exists() and stamp.read_text() == key:
        return
    shutil.rmtree(target, ignore_errors=True)
    log(f"installing {len(pins)} wheels for CPython {PYTHON} {arch} into {target}")
    cmd = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", "--target", str(target),
        "--implementation", "cp", "--python-version", PYTHON,
        "--platform", f"manylinux2014_{arch}", "--platform", f"manylinux_2_17_{arch}",
        *pins,
    ]  # fmt: skip
    run_logged(cmd, layout.cache_dir() / f"{SUITE}-root.log", "pip install (python3.9)")
    stamp.write_text(key)


def run_tests(pytest_args: list[str]) -> int:
    """pytest on tests/node under the root's python3.9; its exit status."""
    root = ensure_root()
    ensure_deps(root)
    checkout = suite_root()
    bundle, _ = ensure_bundle()
    mounts = [
        (checkout, "apull", "ro"),
        (bundle.directory, "bundle", "ro"),
        (Path("/proc"), "proc", "rw"),
        (Path("/sys"), "sys", "rw"),
        (Path("/dev"), "dev", "rw"),
    ]
    lines = ["set -e"]
    for source, name, mode in mounts:
        dest = root / name
        lines.append(f"mkdir -p {shlex.quote(str(dest))}")
        lines.append(f"mount --rbind {shlex.quote(str(source))} {shlex.quote(str(dest))}")
        if mode == "ro":
            lines.append(f"mount -o remount,bind,ro {shlex.quote(str(dest))}")
    pytest = [
        "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
        f"PYTHONPATH=/apull/src:{DEPS}", "PYTHONDONTWRITEBYTECODE=1",
        "APULL_TEST_BUNDLE=/bundle",
        "python3", "-m", "pytest", "-p", "no:cacheprovider", "--rootdir=/apull",
        *(pytest_args or ["-q", "/apull/tests/node"]),
    ]  # fmt: skip
    lines.append(
        f"exec chroot {shlex.quote(str(root))} " + " ".join(shlex.quote(a) for a in pytest)
    )
    version = subprocess.run(
        ["chroot", str(root), "python3", "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    glibc = subprocess.run(
        ["chroot", str(root), "getconf", "GNU_LIBC_VERSION"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    _say(f"node tests under Debian {SUITE}: python3 {version}, {glibc}")
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)],
        check=False,
    ).returncode


def main(argv: list[str] | None = None) -> int:
    try:
        return run_tests(list(sys.argv[1:] if argv is None else argv))
    except LabError as err:
        print(f"py39: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
