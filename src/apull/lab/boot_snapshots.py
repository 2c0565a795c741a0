"""Boot snapshots: a lab node as it is the moment its first fresh boot answers ssh, saved so
that a later fresh reset resumes that machine in seconds instead of booting it again under
software emulation (45 s for one node alone, about 110 s for three at once on two cores).

A snapshot is QEMU's machine state (RAM and devices, written by an outgoing migration to a
file) and a copy of the disk overlay taken while the machine is stopped, kept per node and
variant in the node's directory (`lab down` removes it). It is bound to the node's whole
QEMU command line: a new image, kernel, port or identity makes it stale and the node boots.

A resumed node is the same boot as the snapshot: same boot id, same host keys, same random
state. Its clock is set from the host's at once (it resumes at the snapshot's time). Any
failure to save or resume falls back to a real boot, with the reason in the log."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from apull.lab import layout, nodes
from apull.lab.image import LabImages
from apull.lab.qmp import Monitor, QmpError
from apull.lab.run import LabError, Log

#: How long the machine state may take to write (about 300 MB of a 1 GiB node).
SAVE_TIMEOUT = 180.0
#: How long a resumed node may take to answer ssh before it is booted instead.
RESUME_TIMEOUT = 90.0
#: Migration bandwidth while saving: QEMU's default (32 MiB/s) would take 10 s and more.
SAVE_BANDWIDTH = 4 << 30


@dataclass(frozen=True)
class BootSnapshot:
    """One node's snapshot in one variant."""

    nd: nodes.NodeDir

    @property
    def path(self) -> Path:
        return self.nd.path / "boot-snapshots" / self.nd.node.variant

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def key_file(self) -> Path:
        return self.path / "key"

    def usable(self, images: LabImages) -> bool:
        """Saved from the command line this node would boot with now."""
        try:
            saved = self.key_file.read_text().strip()
        except FileNotFoundError:
            return False
        fits = saved == command_key(self.nd, images)
        return fits and self.disk.is_file() and self.state.is_file()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def command_key(nd: nodes.NodeDir, images: LabImages) -> str:
    """What the snapshot must match: the node's QEMU command line and the image its disk
    overlay stands on (the images' directory is named after their build's inputs)."""
    command = nodes.qemu_command(nd, images)
    backing = str(images.disk(nd.node.variant))
    return hashlib.sha256(json.dumps([command, backing]).encode()).hexdigest()


def save(nd: nodes.NodeDir, images: LabImages, log: Log) -> bool:
    """Save the running node (just booted fresh) as its boot snapshot. The node is stopped
    for the few seconds this takes and then goes on; False (and a log line) if it failed."""
    snap = BootSnapshot(nd)
    started = time.monotonic()
    work = snap.path.with_name(snap.path.name + ".new")
    shutil.rmtree(work, ignore_errors=True)
    try:
        # No ssh session of ours should live on in the saved machine.
        nodes.close_ssh(nd.node)
        work.mkdir(parents=True)
        with Monitor(nd.monitor) as mon:
            mon.execute("stop")
            try:
                mon.execute("migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
                target = shlex.quote(str(work / "state"))
                mon.execute("migrate", uri=f"exec:cat > {target}")
                _wait_for_migration(mon)
                # Stopped, and the migration flushed and released the disk: a whole copy.
                shutil.copyfile(nd.disk, work / "disk.qcow2")
            finally:
                mon.execute("cont")
        (work / "key").write_text(command_key(nd, images) + "\n")
        snap.discard()
        work.rename(snap.path)
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        log(f"{nd.node.name}: no boot snapshot, later resets boot it ({exc})")
        return False
    size = (snap.state.stat().st_size + snap.disk.stat().st_size) / 1e6
    seconds = time.monotonic() - started
    log(f"{nd.node.name}: boot snapshot saved in {seconds:.1f} s ({size:.0f} MB)")
    return True


def _wait_for_migration(mon: Monitor) -> None:
    deadline = time.monotonic() + SAVE_TIMEOUT
    while True:
        info = mon.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QmpError(f"saving the machine state {status}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            mon.execute("migrate_cancel")
            raise QmpError(f"saving the machine state took over {SAVE_TIMEOUT:.0f} s")
        time.sleep(0.2)


def resume(nd: nodes.NodeDir, images: LabImages) -> None:
    """Start the node from its boot snapshot (check usable() first) and let it run: it was
    saved stopped, and QEMU keeps a migrated machine's run state."""
    snap = BootSnapshot(nd)
    nodes.start_node(nd, images, fresh=True, restore=(snap.disk, snap.state))
    deadline = time.monotonic() + RESUME_TIMEOUT
    try:
        with Monitor(nd.monitor) as mon:
            while mon.execute("query-status").get("status") == "inmigrate":
                if time.monotonic() > deadline:
                    raise QmpError("loading its machine state takes too long")
                time.sleep(0.2)
            mon.execute("cont")
    except QmpError as exc:
        # QEMU quits when the state does not load (daemonized, it says nothing more).
        raise LabError(f"its machine state did not load ({exc})") from exc


def set_clock(node: layout.LabNode) -> None:
    """A resumed node's clock stands at the snapshot's time: set it to the host's."""
    res = nodes.ssh(node, f"date -u -s @{time.time():.3f} >/dev/null", timeout=60)
    if res.returncode != 0:
        raise LabError(f"{node.name}: cannot set the clock: {res.stderr.strip()}")
