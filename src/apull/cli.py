"""`apull`: the suite's command line (config check, the lab, playbook runs)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apull.bundle.artefacts import BundleError
from apull.config import (
    ClusterConfig,
    ConfigError,
    default_config_path,
    format_problems,
    load_config,
    load_config_with_servers,
)
from apull.lab import layout
from apull.lab.run import LabError
from apull.paths import suite_root

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False)
if not out.is_terminal:
    out.width = 160  # logs and CI: keep table rows on one line


def _log(message: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}")


def _load(path: Path) -> ClusterConfig:
    cfg = load_config(path)
    for warning in cfg.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    return cfg


def lab_nodes(cfg: ClusterConfig) -> list[layout.LabNode]:
    return [
        layout.LabNode.from_name(node.name, node.lab_variant or "ondemand") for node in cfg.nodes
    ]


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    out.print(f"{cfg.path}: TARGET={cfg.target}, {len(cfg.nodes)} node(s), registry {cfg.registry}")
    for node in cfg.nodes:
        variant = f" ({node.lab_variant})" if node.lab_variant else ""
        out.print(f"  {node.name}: {escape(node.endpoint)}{variant}")
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    from apull.lab import nodes

    cfg = _load(args.config)
    by_name = {n.name: n for n in lab_nodes(cfg)} if cfg.target == "lab" else {}
    if args.node not in by_name:
        known = ", ".join(sorted(by_name)) or "none (TARGET is not lab)"
        console.print(f"[red]no lab node {args.node!r}[/red]; lab nodes: {known}")
        return 2
    cmd = nodes.ssh_command(by_name[args.node], *args.remote)
    if not args.remote:
        cmd.insert(1, "-t")
    os.execvp(cmd[0], cmd)


def cmd_lab(args: argparse.Namespace) -> int:
    from apull.lab import lab

    if args.action != "reset" and args.nodes:
        console.print(f"[red]apull lab {args.action} takes no node names")
        return 2
    if args.action == "down":
        lab.down(_log)
        return 0
    if args.action == "status":
        return _print_lab_status()
    cfg = _load(args.config)
    if cfg.target != "lab":
        console.print(f"[red]{cfg.path}: TARGET={cfg.target}: the lab is only for TARGET=lab")
        return 2
    if args.action == "reset":
        rc = _reset(lab_nodes(cfg), args.nodes, args.if_changed, args.power_cycle)
        if rc == 0 and cfg.lab_kubernetes:
            # A fresh node has no kubelet: join it again (the others stay as they are).
            _log("joining the reset nodes to the lab's Kubernetes cluster again")
            lab.up(lab_nodes(cfg), _log, kubernetes=True)
        return rc
    report = lab.up(lab_nodes(cfg), _log, kubernetes=cfg.lab_kubernetes)
    _log(
        f"lab up: images ready in {report.build_seconds:.0f} s, "
        f"booted {len(report.booted)} node(s) in {report.boot_seconds:.0f} s, "
        f"{len(report.kept)} already running"
    )
    if report.cluster is not None:
        slowest = max(report.cluster.ready_seconds.values(), default=0.0)
        _log(
            f"lab up: Kubernetes control plane ready in "
            f"{report.cluster.control_plane_seconds:.0f} s, every node Ready "
            f"{slowest:.0f} s after the cluster step began"
        )
    return _print_lab_status()


def _reset(
    configured: list[layout.LabNode], names: list[str], if_changed: bool, power_cycle: bool
) -> int:
    from apull.lab import lab

    by_name = {n.name: n for n in configured}
    unknown = [name for name in names if name not in by_name]
    if not names or unknown:
        known = ", ".join(sorted(by_name)) or "none"
        what = f"no lab node {', '.join(unknown)}" if unknown else "name the nodes to reset"
        console.print(f"[red]{what}[/red]; lab nodes: {known}")
        return 2
    started = time.monotonic()
    targets = [by_name[name] for name in dict.fromkeys(names)]
    if if_changed and power_cycle:
        console.print("[red]--if-changed and --power-cycle do not go together")
        return 2
    if if_changed:
        targets = [n for n in targets if lab.diverged(n)]
        if not targets:
            _log("nothing to reset: every node is as its variant boots")
            return 0
    lab.reset(targets, _log, power_cycle=power_cycle)
    what = "power-cycled" if power_cycle else "reset"
    _log(f"{what} {len(targets)} node(s) in {time.monotonic() - started:.0f} s")
    return 0


def _print_lab_status() -> int:
    from apull.lab import lab

    rows, registry_up = lab.status()
    kube = lab.kube_status()
    table = Table(title="apull lab", title_justify="left")
    columns = ["node", "variant", "qemu", "ssh", "kernel", "containerd", "uptime"]
    for column in columns + (["kubernetes"] if kube is not None else []):
        table.add_column(column)
    for row in rows:
        cells = [
            row.name, row.variant,
            "running" if row.running else "[red]stopped",
            f"127.0.0.1:{row.ssh_port}" + ("" if row.reachable else " [red](no answer)"),
            row.kernel, row.containerd, row.uptime,
        ]  # fmt: skip
        if kube is not None:
            cells.append(_ready_cell(kube.nodes.get(row.name)) if kube.api_up else "-")
        table.add_row(*cells)
    out.print(table)
    out.print(
        f"registry {layout.host_registry()} (nodes: {layout.guest_registry()}): "
        + ("up" if registry_up else "down")
    )
    healthy = registry_up and rows and all(r.reachable for r in rows)
    if kube is not None:
        out.print(
            f"kubernetes apiserver {kube.url}: "
            + ("up" if kube.api_up else f"[red]down[/red] ({kube.error})")
            + f"; kubeconfig {layout.admin_kubeconfig()}"
        )
        healthy = healthy and kube.api_up and all(kube.nodes.get(r.name) == "True" for r in rows)
    return 0 if healthy else 1


def _ready_cell(ready: str | None) -> str:
    if ready is None:
        return "[red]not registered"
    return "Ready" if ready == "True" else f"[red]NotReady ({ready})"


def _without_mitogen(env: dict[str, str]) -> None:
    """APULL_MITOGEN=0: Ansible's own linear strategy instead of ansible.cfg's Mitogen one."""
    env["ANSIBLE_STRATEGY"] = "linear"


def _use_timing(env: dict[str, str]) -> None:
    """Add the timing callback to the ones ansible.cfg enables."""
    enabled = env.get("ANSIBLE_CALLBACKS_ENABLED", "apull.deploy.summary")
    env["ANSIBLE_CALLBACKS_ENABLED"] = f"{enabled},apull.deploy.timing"


def run_playbook(
    cfg: ClusterConfig, playbook: str, extra: Sequence[str], *, profile: bool = False
) -> int:
    root = suite_root()
    env = dict(os.environ)
    env["APULL_CONFIG"] = str(cfg.path)
    env["APULL_WARNINGS_SHOWN"] = "1"
    env.setdefault("ANSIBLE_CONFIG", str(root / "ansible.cfg"))
    venv_bin = Path(sys.executable).parent
    if os.environ.get("APULL_MITOGEN") == "0":
        _without_mitogen(env)
    if profile or os.environ.get("APULL_PROFILE") == "1":
        _use_timing(env)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    name = playbook if playbook.endswith(".yml") else f"{playbook}.yml"
    cmd = [str(venv_bin / "ansible-playbook"), str(root / "playbooks" / name), *extra]
    _log(f"ansible-playbook playbooks/{name} {' '.join(extra)}".rstrip())
    started = time.monotonic()
    rc = subprocess.run(cmd, cwd=root, env=env, check=False).returncode
    _log(f"playbook {name} finished in {time.monotonic() - started:.1f} s (exit {rc})")
    return rc


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg.target == "lab" and not args.no_lab:
        from apull.lab import lab

        lab.up(lab_nodes(cfg), _log, kubernetes=cfg.lab_kubernetes)
    return run_playbook(cfg, args.playbook, args.ansible_args, profile=args.profile)


def cmd_bundle(args: argparse.Namespace) -> int:
    from apull.bundle.builder import ensure_bundle

    started = time.monotonic()
    bundle, built = ensure_bundle(args.out, force=args.force)
    took = time.monotonic() - started
    _log(f"bundle {bundle.directory}: {'built' if built else 'up to date'} in {took:.1f} s")
    for b in bundle.binaries:
        out.print(
            f"  {b.platform:14} {b.name:22} {b.sha256[:16]}  {b.size / 1e6:5.1f} MB"
            f"  -> {b.install_path}  ({b.serves})"
        )
    return 0


def cmd_sync_bin(args: argparse.Namespace) -> int:
    from apull.tasks.sync_bin import sync_bin

    if args.servers is not None:
        cfg = load_config_with_servers(args.config, args.servers)
    else:
        cfg = _load(args.config)
    if cfg.target == "lab" and not args.no_lab:
        from apull.lab import lab

        lab.up(lab_nodes(cfg), _log, kubernetes=cfg.lab_kubernetes)
    return sync_bin(
        cfg,
        rollback=args.rollback,
        check=args.check,
        only=args.nodes,
        prebuilt=args.bundle,
        console=out,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from apull.status.command import status

    # Read-only: the lab is not brought up (a node that is down is reported as unreachable).
    return status(_load(args.config), only=args.nodes, as_json=args.json, prebuilt=args.bundle,
                  console=out)  # fmt: skip


def cmd_k8s_test(args: argparse.Namespace) -> int:
    from apull.kube import daemonset_timing
    from apull.kube.kubectl import Kubectl, KubeError

    cfg = _load(args.config)
    if cfg.kubeconfig_path is None:
        console.print(
            f"{cfg.path}: KUBECONFIG_PATH is empty: the test needs the cluster's kubeconfig"
            + (" (or LAB_KUBERNETES=yes for the lab's)" if cfg.target == "lab" else "")
        )
        return 2
    try:
        timings = daemonset_timing.run(
            Kubectl(cfg.kubeconfig_path),
            args.image,
            namespace=args.namespace,
            command=args.command,
            timeout=args.timeout,
            keep=args.keep,
            say=_log,
        )
    except (KubeError, daemonset_timing.DaemonSetTestError) as err:
        console.print("[red]k8s-test failed:[/red]", end=" ")
        console.print(str(err), markup=False)
        return 1
    table = Table(title=f"DaemonSet of {args.image}")
    for column in ("node", "pod", "image pull (kubelet)", "Running after"):
        table.add_column(column)
    for t in timings:
        pull = f"{t.pull_seconds:.2f} s" if t.pull_seconds is not None else t.pull_note
        table.add_row(t.node, t.pod, pull, f"{t.running_seconds:.1f} s")
    out.print(table)
    return 0


def cmd_chart_image(args: argparse.Namespace) -> int:
    from apull.bundle.builder import ensure_bundle
    from apull.chart import image as chart_image
    from apull.registry.client import RegistryClient, RegistryError

    push_to = args.registry
    pulled_as = args.pulled_as
    if push_to is None:
        cfg = _load(args.config)
        if cfg.target != "lab":
            console.print("--registry HOST:PORT is needed outside the lab")
            return 2
        from apull.lab.registry import ensure_registry

        push_to = ensure_registry().address
        pulled_as = pulled_as or layout.guest_registry()
    started = time.monotonic()
    bundle, built = ensure_bundle()
    _log(f"bundle {bundle.directory}: {'built' if built else 'up to date'}")
    image = chart_image.build(bundle, _log)
    try:
        digest = chart_image.push(RegistryClient(push_to), image)
    except RegistryError as err:
        console.print(f"[red]push to {push_to} failed:[/red] {err}")
        return 1
    _log(f"pushed {image.reference(push_to)} ({digest}, {image.architecture}) in "
         f"{time.monotonic() - started:.0f} s; chart values: image.architecture="
         f"{image.architecture}")  # fmt: skip
    out.print(image.reference(pulled_as or push_to))
    return 0


def cmd_cri(args: argparse.Namespace) -> int:
    from apull_node.cri.cli import main as cri_main

    return cri_main(args.cri_args, prog="apull cri")


def _cri_arguments(argv: Sequence[str] | None) -> list[str] | None:
    """The arguments after `cri` when it is the command: they are all the cri command's
    (argparse would take its options, such as --help, for apull's own)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:2] and words[0] == "--config":
        words = words[2:]
    elif words[:1] and words[0].startswith("--config="):
        words = words[1:]
    return words[1:] if words[:1] == ["cri"] else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apull", description=__doc__)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $APULL_CONFIG or ./config.txt)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("config", help="check config.txt and show the nodes it names")
    c.add_argument("action", choices=["check"])
    c.set_defaults(func=cmd_config_check)
    lab_p = sub.add_parser("lab", help="the local lab of QEMU nodes")
    lab_p.add_argument("action", choices=["up", "down", "status", "reset"])
    lab_p.add_argument(
        "nodes",
        nargs="*",
        metavar="NODE",
        help="reset: the nodes to boot afresh from their variant's image (all at once)",
    )
    lab_p.add_argument(
        "--if-changed",
        action="store_true",
        help="reset: only the nodes no longer in their variant's state (e.g. upgraded)",
    )
    lab_p.add_argument(
        "--power-cycle",
        action="store_true",
        help="reset: keep the nodes' disks; switch them off and on, as a power cycle would "
        "(their boot loader decides what they boot)",
    )
    lab_p.set_defaults(func=cmd_lab)
    ssh_p = sub.add_parser("ssh", help="open a shell (or run a command) on a lab node")
    ssh_p.add_argument("node", help="node name, e.g. node1")
    ssh_p.add_argument("remote", nargs=argparse.REMAINDER, help="command to run instead of a shell")
    ssh_p.set_defaults(func=cmd_ssh)
    r = sub.add_parser(
        "run",
        help="run a playbook against the configured nodes; other options go to ansible-playbook",
    )
    r.add_argument("playbook", help="playbook name under playbooks/ (e.g. site)")
    r.add_argument("--no-lab", action="store_true", help="do not bring the lab up first")
    r.add_argument(
        "--profile",
        action="store_true",
        help="time every task, role and play (also APULL_PROFILE=1); slowest first at the end",
    )
    r.set_defaults(func=cmd_run)
    b = sub.add_parser("bundle", help="build the node binaries (reused when up to date)")
    b.add_argument("--out", type=Path, default=None, help="directory (default build/bundle)")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.set_defaults(func=cmd_bundle)
    sb = sub.add_parser(
        "sync-bin",
        help="install the node binaries on every node (replaces tools/sync_bin.sh)",
    )
    sb.add_argument("nodes", nargs="*", metavar="NODE", help="only these nodes (default: all)")
    sb.add_argument("--rollback", action="store_true", help="put back the previous binaries")
    sb.add_argument("--check", action="store_true", help="say what would change, change nothing")
    sb.add_argument(
        "--servers",
        type=Path,
        default=None,
        help="a legacy servers.txt: sync to its hosts (SSH_* still from the config)",
    )
    sb.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="send this prebuilt bundle as it is (checked against its manifest)",
    )
    sb.add_argument("--no-lab", action="store_true", help="do not bring the lab up first")
    sb.set_defaults(func=cmd_sync_bin)
    st = sub.add_parser(
        "status",
        help="every node's stack against this checkout: drift, services, cache, images; "
        "exit 1 unless all are ready",
    )
    st.add_argument("nodes", nargs="*", metavar="NODE", help="only these nodes (default: all)")
    st.add_argument("--json", action="store_true", help="the JSON document (docs/status.md)")
    st.add_argument(
        "--bundle", type=Path, default=None, help="compare with this prebuilt bundle's binaries"
    )
    st.set_defaults(func=cmd_status)
    kt = sub.add_parser(
        "k8s-test",
        help="the documents' test: a DaemonSet of IMAGE on every Ready node, with kubelet's "
        "pull time and the time to Running per node",
    )
    kt.add_argument("image", help="image reference as the nodes pull it")
    kt.add_argument(
        "--namespace",
        default="apull-k8s-test",
        help="namespace (default apull-k8s-test; made and removed when missing)",
    )
    kt.add_argument("--command", default=None, help="run this with sh -c instead of the image's")
    kt.add_argument(
        "--timeout", type=float, default=900.0, help="seconds until every pod is Running (900)"
    )
    kt.add_argument("--keep", action="store_true", help="leave the DaemonSet in place")
    kt.set_defaults(func=cmd_k8s_test)
    ci = sub.add_parser(
        "chart-image",
        help="build the chart's installer image (charts/apull) and push it; prints its reference",
    )
    ci.add_argument(
        "--registry", default=None, help="push to HOST:PORT (plain HTTP; default the lab's)"
    )
    ci.add_argument(
        "--pulled-as", default=None, help="the registry as nodes name it, for the printed reference"
    )
    ci.set_defaults(func=cmd_chart_image)
    cri = sub.add_parser(
        "cri",
        add_help=False,
        help="pull/rmi/ls/status images through containerd's CRI plugin (apull cri --help)",
    )
    cri.add_argument("cri_args", nargs=argparse.REMAINDER)
    cri.set_defaults(func=cmd_cri)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    cri_args = _cri_arguments(argv)
    if cri_args is not None:
        return cmd_cri(argparse.Namespace(cri_args=cri_args))
    args, unknown = parser().parse_known_args(argv)
    if unknown and args.command != "run":
        parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    # Whatever `apull run` does not know goes to ansible-playbook (--check, --diff, -l ...).
    args.ansible_args = [a for a in unknown if a != "--"]
    if args.config is None:
        args.config = default_config_path()
    try:
        return int(args.func(args))
    except ConfigError as err:
        console.print(format_problems(err), markup=False)
        console.print("nothing was run.")
        return 2
    except BundleError as err:
        console.print(f"[red]bundle error:[/red] {err}")
        return 2
    except LabError as err:
        console.print("[red]lab error:[/red]", end=" ")
        console.print(str(err), markup=False)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
