"""The node tests under the nodes' oldest python3: Debian 11's python3.9 in a build root.

`python -m apull.lab.py39_root [--arch arm64] [PYTEST ARGS]` (`make unit-py39`, and
`make unit-py39-arm64` in `make test-all`):

1. debootstraps Debian 11 `bullseye` (glibc 2.31, python3.9), once, into the lab cache; for
   another architecture (arm64) its programs run under qemu-user-static, registered with
   the kernel's binfmt_misc for the run (Debian's own registration line, flag F: the
   interpreter is opened once, so it works inside the root);
2. installs what the tests need for CPython 3.9 on that architecture into it (`pip
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
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from apull.bundle.builder import NATIVE_DEPENDENCIES, PURE_DEPENDENCIES, ensure_bundle
from apull.lab import emulation, layout
from apull.lab.emulation import MACHINES, host_arch
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


def root_dir(arch: str) -> Path:
    suffix = "" if arch == "amd64" else f"-{arch}"
    return layout.cache_dir() / f"{SUITE}{suffix}-root"


def ensure_root(arch: str = "amd64", log: Log = _say) -> Path:
    """Debian 11 of `arch` with python3, debootstrapped once into the lab cache."""
    cache = layout.cache_dir()
    root = root_dir(arch)
    stamp = root / ".apull-packages"
    emulation.ensure_emulation(arch, log)
    if stamp.exists() and stamp.read_text() == PACKAGES:
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    logfile = cache / f"{SUITE}-root.log"
    slow = "" if arch == host_arch() else ", emulated: several minutes"
    log(f"debootstrap {SUITE} {arch} (python3.9, glibc 2.31) into {root} (once{slow})")
    run_logged(
        ["debootstrap", f"--arch={arch}", "--variant=minbase", f"--include={PACKAGES}", SUITE,
         tmp, debian_mirror()],
        logfile,
        f"debootstrap {SUITE} {arch}",
    )  # fmt: skip
    run_logged(["chroot", tmp, "apt-get", "clean"], logfile, "apt-get clean")
    (tmp / ".apull-packages").write_text(PACKAGES)
    tmp.rename(root)
    return root


#: Where the node-side Ansible modules (node_facts, fs_ctl, kernel_modules) find
#: ansible.module_utils on a node, the controller's ansible-core sends it with each module;
#: the tests import it from the same release. Its package says Python >= 3.11 (the
#: controller's need), hence --ignore-requires-python; module_utils serve 3.8 and newer.
CONTROLLER_SIDE = ("ansible-core",)


def _pins() -> list[str]:
    lines = (suite_root() / REQUIREMENTS).read_text().splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    bundled = [*NATIVE_DEPENDENCIES, *PURE_DEPENDENCIES, *CONTROLLER_SIDE]
    return pins + [f"{d}=={metadata.version(d)}" for d in bundled]


def ensure_deps(root: Path, arch: str = "amd64", log: Log = _say) -> None:
    """The tests' dependencies for CPython 3.9 on `arch`, in the root."""
    pins = _pins()
    arch = MACHINES[arch]
    key = hashlib.sha256("\n".join([arch, *pins]).encode()).hexdigest()
    target = root / DEPS.lstrip("/")
    stamp = target / ".apull-pins"
    if stamp.exists() and stamp.read_text() == key:
        return
    shutil.rmtree(target, ignore_errors=True)
    log(f"installing {len(pins)} wheels for CPython {PYTHON} {arch} into {target}")
    cmd = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--ignore-requires-python", "--only-binary=:all:", "--target", str(target),
        "--implementation", "cp", "--python-version", PYTHON,
        "--platform", f"manylinux2014_{arch}", "--platform", f"manylinux_2_17_{arch}",
        *pins,
    ]  # fmt: skip
    run_logged(cmd, layout.cache_dir() / f"{SUITE}-root.log", "pip install (python3.9)")
    stamp.write_text(key)


def run_tests(pytest_args: list[str], arch: str = "amd64") -> int:
    """pytest on tests/node under the root's python3.9; its exit status."""
    root = ensure_root(arch)
    ensure_deps(root, arch)
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
    machine = subprocess.run(
        ["chroot", str(root), "uname", "-m"], capture_output=True, text=True, check=False
    ).stdout.strip()
    _say(f"node tests under Debian {SUITE} {machine}: python3 {version}, {glibc}")
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)],
        check=False,
    ).returncode


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    arch = host_arch()
    if args[:1] == ["--arch"] and len(args) > 1:
        arch, args = args[1], args[2:]
    if arch not in MACHINES:
        print(f"py39: --arch {arch}: not one of {', '.join(MACHINES)}", file=sys.stderr)
        return 2
    try:
        return run_tests(args, arch)
    except LabError as err:
        print(f"py39: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
