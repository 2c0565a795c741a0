"""The lab as a whole: `up` builds what is missing and boots the nodes, `down` removes
everything that runs, `status` tells what is there."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from apull.lab import (
    boot_snapshots,
    kernel_packages,
    kube_cluster,
    kube_control,
    layout,
    nodes,
    package_repo,
    registry,
    test_image,
)
from apull.lab.image import LabImages, build_images, ensure_rootfs
from apull.lab.modules import node_kernel
from apull.lab.run import LabError, Log
from apull.registry.client import RegistryClient

BOOT_TIMEOUT = 600.0


@dataclass(frozen=True)
class UpReport:
    """What `up` did, with the wall times the closing notes quote."""

    build_seconds: float
    boot_seconds: float
    booted: tuple[str, ...]
    kept: tuple[str, ...]
    image_digest: str
    #: The Kubernetes cluster's start (LAB_KUBERNETES=yes), else None.
    cluster: kube_cluster.ClusterReport | None = None


def up(wanted: list[layout.LabNode], log: Log, kubernetes: bool = False) -> UpReport:
    started = time.monotonic()
    images = build_images(log, frozenset(n.variant for n in wanted))
    build_package_repo(images, log)
    build_seconds = time.monotonic() - started
    layout.state_dir().mkdir(parents=True, exist_ok=True)
    nodes.ensure_switch()
    client = registry.ensure_registry()
    arches = tuple(sorted({"amd64"} | {layout.variant_arch(n.variant) for n in wanted}))
    digest = test_image.push(client, arches)
    log(
        f"registry {layout.host_registry()} serves {test_image.REPO}:{test_image.TAG} "
        f"({'/'.join(arches)}, {digest})"
    )
    package_repo.ensure_repo_server()
    log(f"package repository {layout.host_repo()} (nodes: {layout.guest_repo_url()}) is up")

    wanted_names = {n.name for n in wanted}
    for stale in _known_nodes():
        if stale.node.name not in wanted_names:
            log(f"{stale.node.name}: not in the config any more, removing")
            remove_node(stale)
            if layout.admin_kubeconfig().exists():
                kube_cluster.forget(stale.node.name, log)

    booted: list[nodes.NodeDir] = []
    fresh_boots: list[nodes.NodeDir] = []
    kept: list[str] = []
    boot_start = time.monotonic()
    for node in wanted:
        nd = nodes.NodeDir(node)
        if nd.running() and nd.matches(images):
            kept.append(node.name)
            continue
        fresh = not nd.matches(images)
        if nd.running():
            log(f"{node.name}: image or variant changed, re-creating")
            nodes.stop_node(nd)
        log(f"{node.name}: booting ({node.variant}, ssh 127.0.0.1:{node.ssh_port})")
        nodes.start_node(nd, images, fresh=fresh)
        booted.append(nd)
        if fresh:
            fresh_boots.append(nd)
    if booted:
        log(f"waiting for ssh on {', '.join(nd.node.name for nd in booted)}")
        took = nodes.wait_for_ssh(booted, BOOT_TIMEOUT)
        for name, seconds in sorted(took.items()):
            log(f"{name}: ssh answered after {seconds:.0f} s")
    # Later resets (tests, molecule) resume these instead of booting again.
    for nd in fresh_boots:
        boot_snapshots.save(nd, images, log)
    boot_seconds = time.monotonic() - boot_start
    cluster = kube_cluster.up(wanted, client, log) if kubernetes else None
    if not kubernetes and layout.kube_dir().exists():
        log("LAB_KUBERNETES is off: stopping the kubelets and the lab's control plane")
        kube_cluster.leave(wanted, log)
        kube_cluster.down()
    return UpReport(
        build_seconds=build_seconds,
        boot_seconds=boot_seconds,
        booted=tuple(nd.node.name for nd in booted),
        kept=tuple(kept),
        image_digest=digest,
        cluster=cluster,
    )


def build_package_repo(images: LabImages, log: Log) -> None:
    """The on-demand modules of these images as a package in the lab's repository (and ISO),
    and their whole kernel as packages for the nodes that change release. Always both: labs
    that share the cache then share one repository."""
    cache = layout.cache_dir()
    rootfs = ensure_rootfs(log)
    _, source_version = node_kernel(rootfs)
    modules = cache / "modules" / images.abi
    kernel = kernel_packages.KernelSource(rootfs, images.abi, source_version, modules)
    package_repo.build_repo(
        modules, images.abi, source_version, layout.repo_dir(), log, kernel=kernel
    )


def reset(
    wanted: layout.LabNode | Sequence[layout.LabNode], log: Log, power_cycle: bool = False
) -> dict[str, float]:
    """Bring nodes back to their variant's fresh boot: stop each, drop its disk overlay and
    resume its boot snapshot (boot_snapshots.py), or boot it afresh where it has none (all at
    once), then wait for ssh on all. Returns the seconds each took to answer ssh. Whatever was
    installed or changed on the nodes is gone.

    With power_cycle, each node's disk is kept: its VM is stopped at once, as pulling the
    plug would, and started again, so its boot loader decides what it boots."""
    targets = [wanted] if isinstance(wanted, layout.LabNode) else list(wanted)
    if not targets:
        return {}
    images = build_images(log, frozenset(n.variant for n in targets))
    layout.state_dir().mkdir(parents=True, exist_ok=True)
    nodes.ensure_switch()
    resumed: list[nodes.NodeDir] = []
    for node in targets:
        nd = nodes.NodeDir(node)
        if power_cycle and not nd.disk.exists():
            raise LabError(f"{node.name} has no disk to power-cycle; reset it without it")
        if nodes.stop_node(nd):
            log(f"{node.name}: {'powered off' if power_cycle else 'stopped'}")
        if not power_cycle and boot_snapshots.BootSnapshot(nd).usable(images):
            log(f"{node.name}: resuming its boot snapshot ({node.variant})")
            try:
                boot_snapshots.resume(nd, images)
            except LabError as exc:
                log(f"{node.name}: {exc}")
            resumed.append(nd)
    took = _settle_resumed(resumed, log)
    booted: list[nodes.NodeDir] = []
    for node in targets:
        if node.name in took:
            continue
        nd = nodes.NodeDir(node)
        how = "powering on (its disk kept" if power_cycle else f"booting fresh ({node.variant}"
        log(f"{node.name}: {how}, ssh 127.0.0.1:{node.ssh_port})")
        # A fresh start makes the disk overlay anew; a power cycle boots the one it has.
        nodes.start_node(nd, images, fresh=not power_cycle)
        booted.append(nd)
    took.update(nodes.wait_for_ssh(booted, BOOT_TIMEOUT))  # {} for none
    for name, seconds in sorted(took.items()):
        log(f"{name}: ssh answered after {seconds:.0f} s")
    if not power_cycle:
        for nd in booted:
            boot_snapshots.save(nd, images, log)
    return took


def _settle_resumed(resumed: list[nodes.NodeDir], log: Log) -> dict[str, float]:
    """Wait for the resumed nodes and set their clocks; a node that does not answer is
    stopped and its snapshot dropped (the caller boots it). Seconds to ssh per good node."""
    took: dict[str, float] = {}
    if not resumed:
        return took
    try:
        took = nodes.wait_for_ssh(resumed, boot_snapshots.RESUME_TIMEOUT)
    except LabError as exc:
        log(f"resuming: {exc}")
        for nd in resumed:
            if nd.running() and nodes.ssh(nd.node, "true", timeout=20).returncode == 0:
                took[nd.node.name] = boot_snapshots.RESUME_TIMEOUT
    for nd in resumed:
        if nd.node.name in took:
            try:
                boot_snapshots.set_clock(nd.node)
                continue
            except (LabError, subprocess.SubprocessError) as exc:
                log(str(exc))
                del took[nd.node.name]
        log(f"{nd.node.name}: its boot snapshot did not resume; booting it instead")
        nodes.stop_node(nd)
        boot_snapshots.BootSnapshot(nd).discard()
    return took


#: What the lab's kernel upgrade installs (roles/kernel in the lab).
MODULES_PACKAGE = "apull-ondemand-modules-$(uname -r)"
_STATE_PROBE = (
    f"dpkg-query -W -f='${{Status}}\\n' {MODULES_PACKAGE} 2>/dev/null; "
    "test -e /lib/modules/$(uname -r)/updates/fs_ctl.ko && echo updates; "
    "test -e /etc/apull -o -e /usr/bin/apulld -o -e /var/lib/apull "
    "-o -e /etc/containerd/config.toml.apull-orig "
    "-o -e /etc/containerd/config.toml.apull-orig.absent "
    "&& echo deployed; "
    # A disk-booted node that got a kernel package (deb or RPM) or a changed GRUB default.
    "{ [ $(ls /boot/vmlinuz-* | wc -l) -gt 1 ] "
    "|| [ -e /etc/default/grub.d/90-apull-boot-once.cfg ]; } && echo upgraded"
)


def diverged(node: layout.LabNode) -> bool:
    """True if the node is no longer what its variant boots as: a stock node that got the
    on-demand modules package, an ondemand node without its rebuilt modules, or any node
    with (part of) the apull stack deployed."""
    res = nodes.ssh(node, _STATE_PROBE, timeout=120)
    if res.returncode not in (0, 1):
        raise LabError(f"{node.name}: cannot read its state: {res.stderr.strip()}")
    installed = "install ok installed" in res.stdout
    has_updates = "updates" in res.stdout.split()
    deployed = "deployed" in res.stdout.split()
    upgraded = "upgraded" in res.stdout.split()
    stock = node.variant in ("stock", *layout.DISK_BOOTED)
    return installed or deployed or upgraded or (not stock and not has_updates)


def _known_nodes() -> list[nodes.NodeDir]:
    base = layout.state_dir() / "nodes"
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.iterdir()):
        if path.name.startswith("node") and path.name[4:].isdigit():
            variant_file = path / "variant"
            variant = variant_file.read_text().strip() if variant_file.exists() else "stock"
            found.append(nodes.NodeDir(layout.LabNode.from_name(path.name, variant)))
    return found


def remove_node(nd: nodes.NodeDir) -> None:
    nodes.stop_node(nd)
    shutil.rmtree(nd.path, ignore_errors=True)


def down(log: Log) -> None:
    for nd in _known_nodes():
        if nodes.stop_node(nd):
            log(f"{nd.node.name}: stopped")
        shutil.rmtree(nd.path, ignore_errors=True)
    kube_cluster.down()
    registry.stop_registry()
    package_repo.stop_repo_server()
    nodes.stop_switch()
    shutil.rmtree(layout.state_dir(), ignore_errors=True)
    log(f"lab removed (images stay cached in {layout.cache_dir()})")


@dataclass(frozen=True)
class NodeStatus:
    name: str
    variant: str
    running: bool
    ssh_port: int
    reachable: bool
    kernel: str
    uptime: str
    containerd: str


def _probe(nd: nodes.NodeDir) -> NodeStatus:
    reachable, kernel, uptime, containerd = False, "-", "-", "-"
    if nd.running():
        try:
            res = nodes.ssh(
                nd.node, "uname -r; uptime -p; systemctl is-active containerd", timeout=20
            )
        except Exception:
            res = None
        if res is not None and res.returncode in (0, 3):
            reachable = True
            lines = [*res.stdout.splitlines(), "-", "-", "-"]
            kernel, uptime, containerd = lines[0], lines[1], lines[2]
    return NodeStatus(
        nd.node.name, nd.node.variant, nd.running(), nd.node.ssh_port, reachable,
        kernel, uptime, containerd,
    )  # fmt: skip


def status() -> tuple[list[NodeStatus], bool]:
    """Per-node status and whether the registry answers."""
    known = _known_nodes()
    with ThreadPoolExecutor(max_workers=max(1, len(known))) as pool:
        rows = list(pool.map(_probe, known))
    reg_up = RegistryClient(layout.host_registry()).ping()
    return rows, reg_up


@dataclass(frozen=True)
class KubeStatus:
    """The lab cluster as this machine's kubectl sees it."""

    url: str
    api_up: bool
    nodes: dict[str, str]  #: node -> its Ready condition ("True", "False", "Unknown")
    error: str


def kube_status() -> KubeStatus | None:
    """The cluster's state, or None when the lab runs no Kubernetes."""
    if not layout.admin_kubeconfig().exists():
        return None
    url = kube_control.host_api_url()
    try:
        return KubeStatus(url, True, kube_cluster.node_ready(), "")
    except (LabError, subprocess.TimeoutExpired) as exc:
        return KubeStatus(url, False, {}, str(exc).splitlines()[0])
