"""What the chart's DaemonSet pod runs (`python3 -m apull.chart.pod`, the installer image).

The pod only starts the work; the host does it, so that restarting or deleting the pod
stops nothing on the node:

1. The image's files (Debian with python3, ansible-core, the suite's playbooks, roles and
   prebuilt bundle) are copied once per build into the host directory the chart mounts
   (`/var/lib/apull-chart/root-<build>` on the host).
2. A transient systemd unit on the host (`systemd-run`, entered with nsenter) runs
   ansible-playbook with that directory as its root: `playbooks/chart_node.yml` (fscache and
   deploy: the same roles `make all` runs) for install and upgrade, `playbooks/uninstall.yml`
   for uninstall, against this node through the connection `apull.deploy.host_namespaces`.
   The unit's output (in the host's journal) is followed into this pod's log; a unit left
   running by an earlier pod is waited for.
3. Done, the pod says so (`/tmp/apull-chart-ready`, its readiness probe), removes the roots
   of other builds, and waits. SIGTERM ends it at once: the stack stays, as host units.

A failure exits non-zero (kubelet retries, with back-off); the pod never becomes ready.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

#: The chart mounts the host's directory (APULL_CHART_HOST_DIR) here.
MOUNT = Path(os.environ.get("APULL_CHART_MOUNT", "/host/apull-chart"))
HOST_DIR = os.environ.get("APULL_CHART_HOST_DIR", "/var/lib/apull-chart")
#: The chart's settings: role variables as JSON (its Secret).
SETTINGS = Path(os.environ.get("APULL_CHART_SETTINGS", "/etc/apull-chart/vars.json"))
#: The strategy the pod's playbook runs with: one that ships with ansible-core.
CHART_STRATEGY = "linear"
READY = Path("/tmp/apull-chart-ready")
#: The image's top-level entries the host root needs (bin, lib, sbin are links into usr).
COPIED = ("bin", "etc", "lib", "lib64", "opt", "sbin", "usr", "var")
EMPTY = ("dev", "proc", "sys", "run", "tmp", "root")
PLAYBOOKS = {"install": "playbooks/chart_node.yml", "uninstall": "playbooks/uninstall.yml"}
#: The host's mount namespace is enough for systemctl, systemd-run and journalctl (their
#: sockets and files); without --pid, nsenter execs the command instead of forking it, so
#: stopping it stops the command.
NSENTER = ["nsenter", "--target", "1", "--mount", "--"]
SUITE = "/opt/apull/suite"
UNIT_WAIT_SECONDS = 3600
UNIT = "apull-chart"


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} apull-chart: {message}", flush=True)


def ensure_root(build: str) -> Path:
    """This build's root in the host directory (as this pod sees it), copied once. Keyed on
    the image's own BUILD file: an image pushed again under the same tag is another copy."""
    root = MOUNT / f"root-{build}"
    if (root / ".complete").exists():
        return root
    tmp = MOUNT / f".root-{build}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.monotonic()
    present = [f"/{name}" for name in COPIED if os.path.lexists(f"/{name}")]
    subprocess.run(["cp", "-a", *present, str(tmp)], check=True)
    shutil.rmtree(tmp / SETTINGS.parent.relative_to("/"), ignore_errors=True)  # the Secret
    for name in EMPTY:
        (tmp / name).mkdir(exist_ok=True)
    (tmp / "tmp").chmod(0o1777)
    (tmp / ".complete").write_text(build + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    say(f"copied build {build} to {HOST_DIR}/{root.name} in {time.monotonic() - started:.1f} s")
    return root


def write_run_files(root: Path, node: str, action: str) -> None:
    """The inventory (this node, reached through nsenter) and the variables."""
    settings = json.loads(SETTINGS.read_text()) if SETTINGS.exists() else {}
    if not isinstance(settings, dict):
        raise SystemExit(f"{SETTINGS}: not a JSON object of role variables")
    variables = {
        **settings,
        "apull_target": "chart",
        "apull_kubeconfig_path": "",
        "apull_bundle_dir": "/opt/apull/bundle",
        "apull_bundle_prebuilt": True,
    }
    inventory = {
        "apull_nodes": {
            "hosts": {node: {"ansible_connection": "apull.deploy.host_namespaces"}},
        }
    }
    run = root / SUITE.lstrip("/") / "inventory"
    (run / "chart.json").write_text(json.dumps(inventory, indent=1) + "\n")
    secret = run / "chart-vars.json"  # may hold registry credentials: root only, removed after
    secret.unlink(missing_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(variables) + "\n")
    say(f"{action} on {node} with {len(settings)} setting(s) from {SETTINGS}")


def _unit_state(unit: str) -> str:
    res = subprocess.run([*NSENTER, "systemctl", "is-active", unit],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return res.stdout.strip()


def unit_env() -> dict[str, str]:
    """The environment of the transient unit that runs the playbook on the host."""
    return {
        "PYTHONPATH": "/opt/apull/lib:/opt/apull/suite/src",
        "ANSIBLE_CONFIG": f"{SUITE}/ansible.cfg",
        "ANSIBLE_LOCAL_TEMP": "/tmp/ansible-local",
        "HOME": "/root",
        "PYTHONUNBUFFERED": "1",
        # The modules' own "Invoked with ..." syslog lines would land in the unit's journal.
        "ANSIBLE_NO_TARGET_SYSLOG": "True",
        # ansible.cfg's Mitogen strategy saves ssh round trips; the pod's connection is
        # local (nsenter) and the image carries no Mitogen: Ansible's own strategy.
        "ANSIBLE_STRATEGY": CHART_STRATEGY,
    }


def run_on_host(build: str, action: str) -> int:
    """ansible-playbook in a transient unit on the host, rooted in this build's copy. One unit
    name for every action: an uninstall waits for an install an earlier pod left running."""
    unit = UNIT
    deadline = time.monotonic() + UNIT_WAIT_SECONDS
    while _unit_state(unit) in ("active", "activating", "deactivating"):
        if time.monotonic() > deadline:
            say(f"{unit} is still running after {UNIT_WAIT_SECONDS} s")
            return 1
        say(f"{unit} (started by an earlier pod) is still running: waiting for it to end")
        time.sleep(10)
    subprocess.run([*NSENTER, "systemctl", "reset-failed", unit],
                   capture_output=True, check=False)  # fmt: skip
    env = unit_env()
    # No --pipe: the unit's output goes to the journal and this pod follows it there, so
    # the unit runs on whatever happens to the pod (the uninstall stops this very container).
    command = [
        *NSENTER, "systemd-run", f"--unit={unit}", "--wait", "--collect", "--quiet",
        f"--property=RootDirectory={HOST_DIR}/root-{build}", "--property=MountAPIVFS=yes",
        "--property=PrivateTmp=yes", f"--working-directory={SUITE}",
        *(f"--setenv={k}={v}" for k, v in env.items()),
        "/usr/bin/python3", "-m", "ansible.cli.playbook",
        "-i", f"{SUITE}/inventory/chart.json", "-e", f"@{SUITE}/inventory/chart-vars.json",
        f"{SUITE}/{PLAYBOOKS[action]}",
    ]  # fmt: skip
    say(f"running {PLAYBOOKS[action]} on the host as {unit}")
    follow = subprocess.Popen([*NSENTER, "journalctl", f"--unit={unit}", "--follow",
                               "--lines=0", "--output=cat"])  # fmt: skip
    try:
        return subprocess.run(command, check=False).returncode
    finally:
        time.sleep(2)  # the journal's last lines
        follow.terminate()
        follow.wait()


def remove_other_roots(keep: str | None) -> None:
    """Other builds' copies, and copies a stopped pod left half made."""
    for path in sorted([*MOUNT.glob("root-*"), *MOUNT.glob(".root-*.tmp")]):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
            say(f"removed {HOST_DIR}/{path.name}")


def _stop(_signum: int, _frame: object) -> None:
    say("stopping; the stack stays on the host")
    sys.exit(0)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    action = os.environ.get("APULL_CHART_ACTION", "install")
    node = os.environ.get("NODE_NAME", "")
    build_file = Path("/opt/apull/BUILD")
    build = build_file.read_text().strip() if build_file.exists() else ""
    if action not in PLAYBOOKS or not node or not build:
        say(f"APULL_CHART_ACTION={action!r} (install or uninstall) and NODE_NAME={node!r} must "
            f"be set, and the image must name its build in {build_file} ({build!r})")  # fmt: skip
        return 2
    root = ensure_root(build)
    write_run_files(root, node, action)
    try:
        rc = run_on_host(build, action)
    finally:
        (root / SUITE.lstrip("/") / "inventory" / "chart-vars.json").unlink(missing_ok=True)
    if rc != 0:
        say(f"{PLAYBOOKS[action]} failed on {node} (exit {rc}); this pod exits and is retried")
        return rc
    remove_other_roots(keep=None if action == "uninstall" else root.name)
    READY.write_text(f"{action} {build}\n")
    say(f"{action} done on {node}; waiting (the stack runs as host units)")
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
