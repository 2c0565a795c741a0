"""The lab cluster's control plane: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, on this machine but on the lab network, never on the host's own interfaces.

The lab network is the nodes' VDE switch. The control plane gets its seat on it in a
network namespace of its own (one per lab state directory): a tap device plugged into the
switch (vde_plug2tap) with the address layout.CONTROL_PLANE_ADDR. etcd listens on that
namespace's loopback only; the apiserver serves TLS on CONTROL_PLANE_ADDR:6443, with RBAC and
the Node authorizer. The host's own kubectl reaches it through a loopback forward
(127.0.0.1:APULL_LAB_KUBE_PORT, socat entering the namespace per connection). The host's
network is left as it is: no address, route or interface is added outside the namespace.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from apull.lab import layout, nodes, processes
from apull.lab.kube_pki import KeyPair, Pki, kubeconfig, write_private
from apull.lab.run import LabError, Log, run_logged, tail

API_PORT = 6443
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
#: The tap device inside the namespace.
TAP = "lab0"
#: What the apiserver's certificate names.
API_DNS = (
    "kubernetes", "kubernetes.default", "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local", "localhost",
)  # fmt: skip
READY_TIMEOUT = 120.0


def netns_name() -> str:
    """This lab's namespace: one per state directory, so that labs side by side each have
    their own (every lab's network uses the same addresses)."""
    digest = hashlib.sha256(str(layout.state_dir().resolve()).encode()).hexdigest()[:8]
    return f"apull-lab-{digest}"


def netns_path() -> Path:
    return Path("/run/netns") / netns_name()


def api_url() -> str:
    """The apiserver as nodes and control-plane components see it."""
    return f"https://{layout.CONTROL_PLANE_ADDR}:{API_PORT}"


def host_api_url() -> str:
    """The apiserver as this machine's kubectl sees it (the loopback forward)."""
    return f"https://127.0.0.1:{layout.HOST_KUBE_PORT}"


@dataclass(frozen=True)
class Component:
    """One control-plane process: its name and arguments; it runs in the lab's namespace
    unless in_netns is False (the host-side forward)."""

    name: str
    argv: tuple[str, ...]
    in_netns: bool = True

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name

    def identity(self) -> str:
        """What the running process must match: its argv, and its binary's size and mtime
        (a rebuilt binary restarts the component)."""
        binary = Path(self.argv[0])
        stat = binary.stat() if binary.is_absolute() and binary.exists() else None
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "-"
        return "\n".join((*self.argv, stamp))

    @property
    def pidfile(self) -> Path:
        return layout.kube_dir() / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return layout.kube_dir() / f"{self.name}.log"


def _ip(*args: str) -> None:
    run_logged(["ip", *args], layout.kube_dir() / "netns.log", f"ip {' '.join(args)}")


def _in_netns(argv: list[str]) -> list[str]:
    # nsenter --net (not `ip netns exec`, which remounts /sys) execs the command itself, so
    # the pid Popen returns is the component's.
    return ["nsenter", f"--net={netns_path()}", "--", *argv]


def ensure_network() -> None:
    """The namespace, its tap on the lab switch, and its address; idempotent."""
    layout.kube_dir().mkdir(parents=True, exist_ok=True)
    if not netns_path().exists():
        _ip("netns", "add", netns_name())
    tap_pid = layout.kube_dir() / "tap.pid"
    if not processes.runs(tap_pid, "vde_plug2tap"):
        tap_pid.unlink(missing_ok=True)
        run_logged(
            _in_netns(["vde_plug2tap", "--daemon", f"--pidfile={tap_pid}",
                       f"--sock={nodes.switch_dir()}", TAP]),
            layout.kube_dir() / "netns.log", "plugging the control plane into the lab switch",
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not processes.runs(tap_pid, "vde_plug2tap") and time.monotonic() < deadline:
            time.sleep(0.1)
        if not processes.runs(tap_pid, "vde_plug2tap"):
            raise LabError(f"vde_plug2tap did not stay up; see {layout.kube_dir() / 'netns.log'}")
    addrs = subprocess.run(
        ["ip", "-n", netns_name(), "-o", "addr", "show", "dev", TAP],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    if f"{layout.CONTROL_PLANE_ADDR}/" not in addrs:
        _ip("-n", netns_name(), "addr", "add",
            f"{layout.CONTROL_PLANE_ADDR}/{layout.LAN_MASK_BITS}", "dev", TAP)  # fmt: skip
    _ip("-n", netns_name(), "link", "set", "lo", "up")
    _ip("-n", netns_name(), "link", "set", TAP, "up")


def remove_network() -> None:
    processes.stop(layout.kube_dir() / "tap.pid", program="vde_plug2tap")
    if netns_path().exists():
        subprocess.run(["ip", "netns", "del", netns_name()], check=False, capture_output=True)


def ensure_certificates(pki: Pki) -> dict[str, KeyPair]:
    """Every control-plane certificate and kubeconfig (made once, kept)."""
    pairs = {
        "apiserver": pki.ensure(
            "apiserver", "kube-apiserver", server=True, dns=API_DNS,
            ips=(layout.CONTROL_PLANE_ADDR, "127.0.0.1", SERVICE_IP),
        ),
        "apiserver-kubelet-client": pki.ensure(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters",
            client=True,
        ),
        "admin": pki.ensure("admin", "apull-lab-admin", "system:masters", client=True),
        "controller-manager": pki.ensure(
            "controller-manager", "system:kube-controller-manager", client=True
        ),
        "scheduler": pki.ensure("scheduler", "system:kube-scheduler", client=True),
    }  # fmt: skip
    pki.ensure_service_account_key()
    for user in ("controller-manager", "scheduler"):
        write_private(
            layout.kube_dir() / f"{user}.kubeconfig",
            kubeconfig(api_url(), pki.ca.cert, pairs[user], f"system:kube-{user}"),
        )
    write_private(
        layout.admin_kubeconfig(), kubeconfig(host_api_url(), pki.ca.cert, pairs["admin"], "admin")
    )
    return pairs


def components(bin_dir: Path, pki: Pki) -> list[Component]:
    d = layout.kube_dir()
    p = pki.directory
    addr = layout.CONTROL_PLANE_ADDR
    etcd = Component("etcd", (
        "etcd", "--name=lab", f"--data-dir={d / 'etcd'}",
        "--listen-client-urls=http://127.0.0.1:2379",
        "--advertise-client-urls=http://127.0.0.1:2379",
        "--listen-peer-urls=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=lab=http://127.0.0.1:2380", "--listen-metrics-urls=",
    ))  # fmt: skip
    apiserver = Component("kube-apiserver", (
        str(bin_dir / "kube-apiserver"),
        f"--advertise-address={addr}", f"--bind-address={addr}", f"--secure-port={API_PORT}",
        "--insecure-port=0", "--etcd-servers=http://127.0.0.1:2379",
        f"--client-ca-file={p / 'ca.crt'}",
        f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
        f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={p / 'ca.crt'}",
        "--kubelet-preferred-address-types=InternalIP",
        f"--service-account-key-file={p / 'sa.pub'}",
        f"--service-account-signing-key-file={p / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true", "--profiling=false", "--v=1",
    ))  # fmt: skip
    controller_manager = Component("kube-controller-manager", (
        str(bin_dir / "kube-controller-manager"),
        f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
        f"--authentication-kubeconfig={d / 'controller-manager.kubeconfig'}",
        f"--authorization-kubeconfig={d / 'controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1", "--port=0", "--leader-elect=false",
        f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
        "--use-service-account-credentials=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--profiling=false", "--v=1",
    ))  # fmt: skip
    scheduler = Component("kube-scheduler", (
        str(bin_dir / "kube-scheduler"),
        f"--kubeconfig={d / 'scheduler.kubeconfig'}",
        f"--authentication-kubeconfig={d / 'scheduler.kubeconfig'}",
        f"--authorization-kubeconfig={d / 'scheduler.kubeconfig'}",
        "--bind-address=127.0.0.1", "--port=0", "--leader-elect=false", "--profiling=false",
        "--v=1",
    ))  # fmt: skip
    return [etcd, apiserver, controller_manager, scheduler]


def _start(component: Component) -> None:
    """Start the component unless it already runs as asked (same argv, same binary)."""
    args_file = component.pidfile.with_suffix(".args")
    if processes.runs(component.pidfile, component.program):
        if args_file.exists() and args_file.read_text() == component.identity():
            return
        processes.stop(component.pidfile, timeout=20.0, program=component.program)
    argv = list(component.argv)
    with component.log.open("a") as out:
        proc = subprocess.Popen(
            _in_netns(argv) if component.in_netns else argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    component.pidfile.write_text(f"{proc.pid}\n")
    args_file.write_text(component.identity())


def forward_component() -> Component:
    """127.0.0.1:HOST_KUBE_PORT -> the apiserver: socat enters the namespace per connection."""
    script = layout.kube_dir() / "api-forward.sh"
    text = (
        "#!/bin/sh\n"
        f"exec nsenter --net={netns_path()} -- "
        f"socat STDIO TCP:{layout.CONTROL_PLANE_ADDR}:{API_PORT}\n"
    )
    if not script.exists() or script.read_text() != text:
        script.write_text(text)
        script.chmod(0o755)
    return Component("api-forward", (
        "socat", f"TCP-LISTEN:{layout.HOST_KUBE_PORT},bind=127.0.0.1,reuseaddr,fork",
        f"EXEC:{script}",
    ), in_netns=False)  # fmt: skip


def _healthy(pki: Pki, admin: KeyPair) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(str(admin.cert), str(admin.key))
    try:
        with urllib.request.urlopen(f"{host_api_url()}/readyz", context=ctx, timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _check_alive(running: list[Component]) -> None:
    for component in running:
        if not processes.runs(component.pidfile, component.program):
            raise LabError(
                f"{component.name} exited; last lines of {component.log}:\n"
                f"{tail(component.log, 15)}"
            )


def _wait_ready(pki: Pki, admin: KeyPair, running: list[Component], since: float) -> None:
    while not _healthy(pki, admin):
        _check_alive(running)
        if time.monotonic() - since > READY_TIMEOUT:
            raise LabError(
                f"the apiserver is not ready after {READY_TIMEOUT:.0f} s; see "
                f"{layout.kube_dir() / 'kube-apiserver.log'}"
            )
        time.sleep(0.5)


def up(bin_dir: Path, log: Log) -> float:
    """Start (or keep) the control plane; return the seconds until the apiserver was ready.

    etcd and the apiserver first; the controller-manager and the scheduler once the
    apiserver is ready (its RBAC roles made), since they exit when their reads are refused."""
    started = time.monotonic()
    if shutil.which("etcd") is None:
        raise LabError("etcd is missing: run `make deps-kube` (Debian's etcd-server)")
    ensure_network()
    pki = Pki(layout.kube_dir() / "pki")
    pairs = ensure_certificates(pki)
    store, apiserver, *others = components(bin_dir, pki)
    forward = forward_component()
    for component in (store, apiserver, forward):
        _start(component)
    _wait_ready(pki, pairs["admin"], [store, apiserver, forward], started)
    took = time.monotonic() - started
    for component in others:
        _start(component)
    # They exit within a second or two when something is wrong (flags, credentials).
    time.sleep(2.0)
    _check_alive([store, apiserver, forward, *others])
    log(f"control plane ready in {took:.1f} s: {api_url()} on the lab network, "
        f"{host_api_url()} from this machine; kubeconfig {layout.admin_kubeconfig()}")  # fmt: skip
    return took


def down() -> None:
    programs = (("api-forward", "socat"), ("kube-scheduler", "kube-scheduler"),
                ("kube-controller-manager", "kube-controller-manager"),
                ("kube-apiserver", "kube-apiserver"), ("etcd", "etcd"))  # fmt: skip
    for name, program in programs:
        processes.stop(layout.kube_dir() / f"{name}.pid", timeout=20.0, program=program)
    remove_network()
