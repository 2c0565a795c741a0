"""The kernel path as the field has it, on nodes that boot through GRUB from their disks
(tests/integration/kernel510.txt: three Debian 11 nodes on their stock 5.10 kernel, which has
no fscache on-demand support):

- a deliberately broken kernel, rolled out with serial 1: the first node does not come back,
  the rollout stops there, the other two are untouched, and a power cycle brings the first
  back on its old kernel with nothing edited by hand (it was only booted once);
- a batch of 2 (serial 2, max_fail_percentage 0): a failure in the first batch stops the
  next one;
- the ISO path: the role mounts the ISO in the node's CD-ROM drive, dnf installs the `kernel`
  RPM from it (--repofrompath), the ISO is unmounted, the old kernel stays in the boot menu;
- the files source: a package file on the controller, copied, installed, the copy removed;
- check mode: the package, its source and the reboot are named, nothing changes;
- `make all` (playbooks/site.yml): the node reboots once into the new release, the
  `bind ondemand` probe is accepted, the stack is deployed and a converted image runs lazily;
  a second run changes nothing and reboots nothing.

The wall times of the runs are printed (pytest -s, or the report's captured output).
Part of `make test-all` (make integration-kernel); skipped in a lab without kernel510 nodes.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import ROOT, apull, boot_id, recap, reset_nodes, run_on
from lazy_image import push_and_convert, run_lazily

from apull.lab import lab as lab_control
from apull.lab import layout, nodes

OLD = "5.10.0-32-amd64"
#: How long the broken kernel's node is waited for: a good boot takes about a minute here.
BROKEN_TIMEOUT = 240
FAIL_HOOK = "/etc/apt/apt.conf.d/99apull-test-fail"


def _log(message: str) -> None:
    print(f"[lab] {message}")


@pytest.fixture(scope="module")
def k510(lab: list[layout.LabNode]) -> list[layout.LabNode]:
    found = [n for n in lab if n.variant == "kernel510"]
    if len(found) < 3:
        pytest.skip("needs three kernel510 lab nodes (LAB_KERNEL510_NODES)")
    return found[:3]


def kernels(node: layout.LabNode) -> list[str]:
    return sorted(run_on(node, "ls /boot | sed -n 's/^vmlinuz-//p'").stdout.split())


def grubenv(node: layout.LabNode) -> dict[str, str]:
    text = run_on(node, "grub-editenv list").stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def release(node: layout.LabNode) -> str:
    return run_on(node, "uname -r").stdout.strip()


def ondemand_accepted(node: layout.LabNode) -> bool:
    probe = run_on(
        node,
        'modprobe cachefiles && python3 -c "import os,tempfile;'
        "fd=os.open('/dev/cachefiles',os.O_RDWR);"
        "os.write(fd,('dir '+tempfile.mkdtemp(dir='/var/tmp')).encode());"
        "os.write(fd,b'bind ondemand');print('accepted')\"",
    )
    return probe.stdout.strip() == "accepted"


def untouched(node: layout.LabNode, boot: str) -> None:
    assert boot_id(node) == boot, f"{node.name} was rebooted"
    assert release(node) == OLD
    assert kernels(node) == [OLD], f"{node.name} got a kernel"
    assert run_on(node, "test -e /etc/default/grub.d/90-apull-boot-once.cfg").returncode == 1


def fresh(node: layout.LabNode) -> None:
    """The node as its variant boots (an earlier test may have upgraded it)."""
    if lab_control.diverged(node):
        reset_nodes([node])


def test_check_mode_names_the_package_its_source_and_the_reboot_and_changes_nothing(k510):
    first = k510[0]
    fresh(first)
    boot = boot_id(first)
    env = grubenv(first)
    repo = apull("run", "kernel", "--no-lab", "--limit", first.name, "--check", "--diff")
    assert repo.returncode == 0, repo.stdout[-3000:]
    assert (
        "would install apull-lab-kernel from the repository deb [trusted=yes] http://repo.lab/ ./"
        f" with apt, then reboot into it once (GRUB keeps {OLD} as the default"
    ) in " ".join(repo.stdout.split())
    # The GRUB settings it would change, as a diff.
    assert "+++ after: /etc/default/grub.d/90-apull-boot-once.cfg" in repo.stdout
    assert "+GRUB_DEFAULT=saved" in repo.stdout
    iso = apull(
        "run", "kernel", "--no-lab", "--limit", first.name, "--check",
        "-e", "kernel_source=iso", "-e", "kernel_package_manager=dnf",
        "-e", json.dumps({"kernel_packages": ["kernel"]}),
    )  # fmt: skip
    assert iso.returncode == 0, iso.stdout[-3000:]
    assert "would install kernel from the ISO /dev/sr0 mounted on /media/apull-iso with dnf" in (
        " ".join(iso.stdout.split())
    )
    untouched(first, boot)
    assert grubenv(first) == env


def test_a_broken_kernel_stops_the_rollout_and_a_power_cycle_brings_the_old_one_back(k510):
    first, second, third = k510
    before = {n.name: boot_id(n) for n in k510}
    assert release(first) == OLD
    started = time.monotonic()
    result = apull(
        "run", "kernel", "--no-lab",
        "-e", json.dumps({"kernel_packages": ["apull-lab-kernel-broken"]}),
        "-e", f"kernel_reboot_timeout={BROKEN_TIMEOUT}",
    )  # fmt: skip
    print(f"broken rollout stopped after {time.monotonic() - started:.0f} s")
    out = result.stdout
    assert result.returncode != 0, out[-3000:]
    hosts = recap(out)
    assert hosts[first.name][3] == 1, out[-4000:]
    assert second.name not in hosts and third.name not in hosts, out[-4000:]
    assert f"{first.name} did not come back within {BROKEN_TIMEOUT} s" in out
    assert re.search(r"Power-cycle it: GRUB booted 6\.1\.\S+-broken once only", out), out[-3000:]
    assert f"{OLD} is still its default" in out
    untouched(second, before[second.name])
    untouched(third, before[third.name])

    # What the node's console saw: the broken kernel, unable to mount its root.
    console = nodes.NodeDir(first).serial_log.read_text(errors="replace")
    assert "Kernel panic" in console, console[-2000:]

    lab_control.reset(first, _log, power_cycle=True)
    assert boot_id(first) != before[first.name]
    assert release(first) == OLD
    # Nothing was edited by hand: the broken kernel is still installed, GRUB's default is
    # the pinned old kernel and the boot-once entry was used up by the failed boot.
    assert run_on(first, "dpkg-query -W -f='${Status}' apull-lab-kernel-broken").stdout == (
        "install ok installed"
    )
    env = grubenv(first)
    assert f">gnulinux-{OLD}-advanced-" in env["saved_entry"]
    assert env.get("next_entry", "") == ""


def test_a_failure_in_the_first_batch_of_two_stops_the_next(k510):
    first, second, third = k510
    reset_nodes([first])
    before = {n.name: boot_id(n) for n in k510}
    hook = f"echo 'DPkg::Pre-Invoke {{\"/bin/false\";}};' > {FAIL_HOOK}"
    assert run_on(second, hook).returncode == 0
    try:
        result = apull("run", "kernel", "--no-lab", "-e", "apull_kernel_serial=2")
    finally:
        run_on(second, f"rm -f {FAIL_HOOK}")
    out = result.stdout
    assert result.returncode != 0, out[-3000:]
    hosts = recap(out)
    assert hosts[second.name][3] == 1, out[-4000:]
    assert "installing apull-lab-kernel failed" in out
    # The batch's other node stopped where the play was aborted: not rebooted, still on its
    # old kernel, which is still GRUB's default.
    assert first.name in hosts
    assert boot_id(first) == before[first.name]
    assert release(first) == OLD
    assert f"gnulinux-{OLD}-advanced-" in grubenv(first)["saved_entry"]
    # The second batch never started.
    assert third.name not in hosts and f"[{third.name}]" not in out
    untouched(third, before[third.name])


def test_the_iso_path_installs_the_rpm_with_dnf_and_keeps_the_old_kernel(k510):
    _, second, _ = k510
    reset_nodes([second])
    before = boot_id(second)
    started = time.monotonic()
    result = apull(
        "run", "kernel", "--no-lab", "--limit", second.name,
        "-e", "kernel_source=iso", "-e", "kernel_package_manager=dnf",
        "-e", json.dumps({"kernel_packages": ["kernel"]}),
    )  # fmt: skip
    print(f"ISO/RPM kernel upgrade of {second.name}: {time.monotonic() - started:.0f} s")
    out = result.stdout
    assert result.returncode == 0, out[-4000:]
    assert recap(out)[second.name][3] == 0
    assert "TASK [kernel : Mount the ISO]" in out and "TASK [kernel : Unmount the ISO]" in out
    assert run_on(second, "findmnt /media/apull-iso").returncode == 1, "the ISO is still mounted"
    assert boot_id(second) != before
    new = release(second)
    assert new != OLD and new.startswith("6.1.")
    rpm = run_on(second, "rpm -q kernel").stdout.strip()
    assert rpm.startswith("kernel-6.1.") and rpm.endswith(".apull1.x86_64"), rpm
    assert ondemand_accepted(second)
    menu = run_on(second, "grep -o \"menuentry '[^']*'\" /boot/grub/grub.cfg").stdout
    assert f"menuentry 'Debian GNU/Linux, with Linux {OLD}'" in menu
    assert kernels(second) == sorted([OLD, new])
    assert f"gnulinux-{new}-advanced-" in grubenv(second)["saved_entry"]


def test_the_files_source_installs_a_package_file_from_the_controller(k510):
    third = k510[2]
    fresh(third)
    debs = sorted((layout.repo_dir() / "repo").glob("apull-lab-kernel_*_amd64.deb"))
    assert len(debs) == 1, debs
    started = time.monotonic()
    result = apull(
        "run", "kernel", "--no-lab", "--limit", third.name,
        "-e", json.dumps({"kernel_source": "files", "kernel_package_files": [str(debs[0])]}),
    )  # fmt: skip
    print(f"files-source kernel upgrade of {third.name}: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:]
    assert release(third).startswith("6.1.")
    assert ondemand_accepted(third)
    status = run_on(third, "dpkg-query -W -f='${Status}' apull-lab-kernel").stdout
    assert status == "install ok installed"
    assert run_on(third, "test -e /var/tmp/apull-kernel").returncode == 1, "staged copy left"


def test_make_all_moves_stock_510_nodes_to_the_new_release_then_changes_nothing(k510):
    first = k510[0]
    fresh(first)
    # Nodes the ISO and files tests upgraded already: make all must leave their kernel alone.
    upgraded = {n.name for n in k510 if release(n) != OLD}
    assert first.name not in upgraded
    before = {n.name: boot_id(n) for n in k510}
    started = time.monotonic()
    result = apull("run", "site", "--no-lab", timeout=5400)
    first_run = time.monotonic() - started
    print(f"first make all (site) over {len(k510)} nodes: {first_run:.0f} s")
    out = result.stdout
    assert result.returncode == 0, out[-4000:]
    print(out[-2500:])
    report = json.loads((ROOT / ".apull/reports/site-last.json").read_text())["nodes"]
    for node in k510:
        assert release(node).startswith("6.1."), node.name
        # The kernel role's check after the reboot accepted `bind ondemand`; now apulld holds
        # /dev/cachefiles, bound on-demand (the verify step's probe finds it held).
        assert report[node.name]["backend"] == "fscache", report[node.name]
        assert report[node.name]["probe"].startswith("skipped: held by apulld"), report[node.name]
        assert f"gnulinux-{release(node)}-advanced-" in grubenv(node)["saved_entry"]
        rebooted = boot_id(node) != before[node.name]
        assert rebooted == (node.name not in upgraded), (node.name, upgraded)
        plugins = run_on(node, "ctr plugins ls").stdout
        assert re.search(r"^io\.containerd\.snapshotter\.v1\s+apull\s+\S+\s+ok\s*$", plugins, re.M)
    run_lazily(first, push_and_convert("amd64"), "lazy-510")

    booted = {n.name: boot_id(n) for n in k510}
    started = time.monotonic()
    again = apull("run", "site", "--no-lab", timeout=3600)
    print(f"second make all (site): {time.monotonic() - started:.0f} s")
    assert again.returncode == 0, again.stdout[-4000:]
    for node in k510:
        assert recap(again.stdout)[node.name][1] == 0, (node.name, again.stdout[-4000:])
        assert boot_id(node) == booted[node.name], f"{node.name} rebooted on the second run"
