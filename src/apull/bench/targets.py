"""Where a benchmark runs: a lab node (over ssh, fscache backend) or this host (file backend).

A target runs shell scripts where containerd is, so the clock that times a pull and the
container's first output is the target's own; only "the registry has served N bytes by
now" is read here, on the host that runs the registry, the moment the first output line
arrives.
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from pathlib import Path

from apull.bench.host_stack import HostStack
from apull.lab import layout
from apull.lab.nodes import ssh_command

#: On a node: apulld's cache and the snapshotter's data (roles/apull defaults).
NODE_CACHE_DIR = "/var/lib/containerd-apull/cachefiles"
NODE_SNAPSHOTTER_ROOT = "/var/lib/containerd-apull"
#: Read back after the page cache is dropped (see Target.drop_page_cache).
RUNTIME_PROGRAMS = ("ctr", "containerd-shim-runc-v2", "runc")
#: The CRI image client the bundle installs on nodes.
NODE_CRI = "/usr/bin/apull-containerd-grpc cri"


class TargetError(RuntimeError):
    """A script on the target failed; the message has its output."""


class Target(ABC):
    name: str
    backend: str
    #: The registry as the target reaches it (host:port).
    registry: str
    #: `ctr` with the address and the CRI namespace.
    ctr: str
    snapshotter_root: str

    @abstractmethod
    def command(self, script: str) -> list[str]:
        """argv that runs `script` with sh on the target."""

    @abstractmethod
    def cri(self) -> str:
        """The CRI image client as a shell command prefix (pull, rmi, ...)."""

    def cri_pull(self, ref: str) -> str:
        """Shell command pulling `ref` through containerd's CRI (the lazy path)."""
        return f"{self.cri()} pull {ref}"

    @abstractmethod
    def wipe_daemon_caches(self) -> None:
        """Stop apulld and the snapshotter, remove apulld's cache, start them again."""

    def run(self, script: str, timeout: float = 1800.0) -> str:
        result = subprocess.run(
            self.command(script), capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise TargetError(
                f"{self.name}: script failed (exit {result.returncode}):\n{script}\n"
                f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
            )
        return result.stdout

    def stream(self, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(script),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def remove_images(self, refs: list[str]) -> None:
        """Containers of the benchmark, the images, their content and snapshots.

        containerd removes a proxy snapshotter's snapshots in a garbage collection after
        the image is gone; a lease deleted with --sync runs one and waits for it. Then
        every EROFS mount under the snapshotter's root must be gone (30 s at most).
        """
        self.run(
            f"for c in $({self.ctr} containers ls -q | grep '^bench-'); do "
            f"{self.ctr} tasks kill -s KILL $c >/dev/null 2>&1; "
            f"{self.ctr} tasks rm -f $c >/dev/null 2>&1; {self.ctr} containers rm $c; done\n"
            # CRI names an image three ways (tag, repo@digest, config id); its rmi drops all.
            f"{self.cri()} rmi {' '.join(refs)} >/dev/null\n"
            f"{self.ctr} images rm --sync {' '.join(refs)} >/dev/null 2>&1 || true\n"
            f"{self.ctr} leases create --id bench-gc >/dev/null && "
            f"{self.ctr} leases rm --sync bench-gc >/dev/null\n"
            f"snapshots=' {self.snapshotter_root}/snapshots/[^ ]* erofs '\n"
            "i=0\n"
            'while grep -q "$snapshots" /proc/self/mounts; do\n'
            "  i=$((i+1)); test $i -lt 300 || { echo 'EROFS mounts left:' >&2; "
            "grep ' erofs ' /proc/self/mounts >&2; exit 1; }\n"
            "  sleep 0.1\n"
            "done\n"
        )

    def wait_for_snapshotter(self) -> None:
        """containerd reaches the (restarted) snapshotter again (60 s at most): a Prepare
        and Remove of a probe snapshot (listing would only read containerd's own records)."""
        sn = f"{self.ctr} snapshots --snapshotter apull"
        self.run(
            "i=0\n"
            f"until {sn} prepare bench-probe >/dev/null 2>&1; do\n"
            "  i=$((i+1)); test $i -lt 600 || exit 1; sleep 0.1\n"
            "done\n"
            f"{sn} rm bench-probe\n"
        )

    def cold(self, refs: list[str]) -> None:
        """Nothing of the image anywhere: images, content, snapshots, caches, page cache."""
        self.remove_images(refs)
        self.wipe_daemon_caches()
        self.wait_for_snapshotter()
        self.drop_page_cache()

    def drop_page_cache(self) -> None:
        """Nothing of the image in memory. The container runtime's own programs are read
        back: a node that runs containers keeps them in memory, and left cold they would add
        the same disk reads to every start, lazy or full, that no image pull causes."""
        self.run(
            "sync; echo 3 > /proc/sys/vm/drop_caches\n"
            f"for p in {' '.join(RUNTIME_PROGRAMS)}; do\n"
            '  f=$(command -v "$p") && cat "$f" >/dev/null\n'
            "done; true\n"
        )


class NodeTarget(Target):
    backend = "fscache"
    ctr = "ctr -n k8s.io"
    snapshotter_root = NODE_SNAPSHOTTER_ROOT

    def __init__(self, node: layout.LabNode) -> None:
        self.node = node
        self.name = node.name
        self.registry = layout.guest_registry()

    def command(self, script: str) -> list[str]:
        return ssh_command(self.node, "sh", "-c", _quote(script))

    def cri(self) -> str:
        return NODE_CRI

    def wipe_daemon_caches(self) -> None:
        self.run(
            "systemctl stop apull-snapshotter apulld\n"
            f"rm -rf {NODE_CACHE_DIR}\n"
            "systemctl start apulld apull-snapshotter\n"
            "systemctl is-active --quiet apulld apull-snapshotter\n"
        )


class HostTarget(Target):
    name = "host"
    backend = "file"

    def __init__(self, stack: HostStack, cri_command: list[str]) -> None:
        self.stack = stack
        self.registry = stack.registry
        self.ctr = f"ctr --address {stack.containerd.address} -n k8s.io"
        self.snapshotter_root = str(stack.snapshotter_root)
        self._cri = " ".join(cri_command)

    def command(self, script: str) -> list[str]:
        return ["sh", "-c", script]

    def cri(self) -> str:
        return f"{self._cri} --address {self.stack.containerd.address}"

    def wipe_daemon_caches(self) -> None:
        self.stack.wipe_caches()


def _quote(script: str) -> str:
    """One argument for the remote shell (ssh joins its arguments with spaces)."""
    return "'" + script.replace("'", "'\"'\"'") + "'"


def host_target(workdir: Path, registry: str, cri_command: list[str]) -> HostTarget:
    stack = HostStack(workdir, registry)
    stack.start()
    return HostTarget(stack, cri_command)
