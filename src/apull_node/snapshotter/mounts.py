"""The mounts containerd performs for a snapshot (the rules of containerd's overlay snapshotter).

* no parent: bind mount of the snapshot's own fs (rw for active, ro for a view);
* active with parents: overlay, upperdir/workdir its own, lowerdir the parents, nearest first;
* view of one parent: read-only bind mount of that parent's fs;
* view of several: overlay of the parents alone (read-only: no upperdir).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from apull_node.snapshotter.layout import Layout
from apull_node.snapshotter.store import Kind, Snapshot

#: Present when the kernel's overlayfs knows the "index" option.
_OVERLAY_INDEX_PARAMETER = "/sys/module/overlay/parameters/index"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def overlay_options() -> tuple[str, ...]:
    """Options added to every overlay mount: index=off where the kernel has the option.

    (containerd also adds "userxattr" inside user namespaces; we run as root in the host's.)
    """
    return ("index=off",) if os.path.exists(_OVERLAY_INDEX_PARAMETER) else ()


def snapshot_mounts(
    layout: Layout, snapshot: Snapshot, extra_overlay_options: Sequence[str] = ()
) -> list[Mount]:
    own = str(layout.fs_dir(snapshot.id))
    if not snapshot.parent_ids:
        mode = "ro" if snapshot.kind == Kind.VIEW else "rw"
        return [Mount("bind", own, (mode, "rbind"))]
    lowers = [str(layout.fs_dir(i)) for i in snapshot.parent_ids]
    options = list(extra_overlay_options)
    if snapshot.kind == Kind.ACTIVE:
        options += [f"workdir={layout.work_dir(snapshot.id)}", f"upperdir={own}"]
    elif len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(options))]
