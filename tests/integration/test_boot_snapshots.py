"""A reset resumes the node's boot snapshot (boot_snapshots.py) instead of booting it: the
same boot, the disk as it was then, the host's clock, the lab's network; and a snapshot that
no longer loads is dropped, the node boots and a new one is saved."""

from __future__ import annotations

import time

from conftest import boot_id, run_on

from apull.lab import boot_snapshots, nodes
from apull.lab import lab as lab_control

PROBE = "/var/tmp/apull-reset-probe"


def reset(node) -> list[str]:
    lines: list[str] = []
    lab_control.reset([node], lines.append)
    return lines


def test_a_reset_resumes_the_same_boot_with_a_fresh_disk_and_the_hosts_clock(lab):
    node, other = lab[0], lab[1]
    reset(node)  # saves the snapshot if the node had none
    first = boot_id(node)
    assert run_on(node, f"echo changed > {PROBE} && sync").returncode == 0

    lines = reset(node)
    assert f"{node.name}: resuming its boot snapshot ({node.variant})" in lines, lines
    assert not any("booting fresh" in line for line in lines), lines
    # A boot draws a new random boot id; a resumed machine has the snapshot's.
    assert boot_id(node) == first
    assert run_on(node, f"test -e {PROBE}").returncode == 1, "the disk kept a change"
    clock = run_on(node, "date +%s.%N")
    assert abs(float(clock.stdout) - time.time()) < 10, clock.stdout
    state = run_on(node, "systemctl is-active containerd ssh")
    assert state.stdout.split() == ["active", "active"], state.stdout
    assert run_on(node, f"ping -c1 -W5 {other.name}").returncode == 0


def test_a_snapshot_that_does_not_load_is_dropped_and_the_node_boots(lab):
    node = lab[0]
    snap = boot_snapshots.BootSnapshot(nodes.NodeDir(node))
    reset(node)
    assert snap.state.is_file()
    before = boot_id(node)
    with snap.state.open("r+b") as state:
        state.truncate(4096)

    lines = reset(node)
    assert f"{node.name}: its boot snapshot did not resume; booting it instead" in lines, lines
    assert any(line.startswith(f"{node.name}: booting fresh") for line in lines), lines
    assert boot_id(node) != before
    assert any(line.startswith(f"{node.name}: boot snapshot saved") for line in lines), lines
    assert snap.state.stat().st_size > 100 * 1024 * 1024
