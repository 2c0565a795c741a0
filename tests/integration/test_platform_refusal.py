"""A node that no build of the node binaries serves is refused at the very start of `make all`
(preflight), with a message that names what the node has and what is supported, and nothing
on it changes.

The lab's nodes are x86-64 with glibc 2.36: the unsupported platforms are faked on node1 by
bind-mounting a stand-in over `uname` (ppc64le) or `getconf` (glibc 2.12) for the test's
duration. Ansible itself never asks either; only the suite's platform probe does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import apull, recap, run_on

from apull.lab import layout

#: Everything the suite could touch on a node, hashed, plus the services' and modules' state.
STATE = (
    "find /usr/bin /usr/libexec/apull /etc/apull /etc/containerd /etc/systemd/system "
    "/etc/modules-load.d /var/lib/apull -xdev -type f 2>/dev/null | sort | xargs -r sha256sum; "
    "systemctl is-active containerd apulld apull-snapshotter 2>&1; "
    "lsmod | awk '$1 ~ /^(erofs|cachefiles)$/ {print $1}' | sort; "
    "cat /sys/module/fs_ctl/parameters/* 2>/dev/null"
)

FAKES = {
    "uname": (
        "/usr/bin/uname",
        '#!/bin/sh\ncase "$1" in -m) echo ppc64le ;; *) exec /root/.apull-test/uname.real "$@" ;; '
        "esac\n",
    ),
    "getconf": (
        "/usr/bin/getconf",
        '#!/bin/sh\nif [ "$1" = GNU_LIBC_VERSION ]; then echo "glibc 2.12"; '
        'else exec /root/.apull-test/getconf.real "$@"; fi\n',
    ),
}


@pytest.fixture
def node1(lab: list[layout.LabNode]) -> layout.LabNode:
    return next(n for n in lab if n.name == "node1")


@pytest.fixture(params=sorted(FAKES))
def faked(request: pytest.FixtureRequest, node1: layout.LabNode) -> Iterator[str]:
    """One of the node's commands replaced (bind mount, undone afterwards)."""
    name = request.param
    path, script = FAKES[name]
    setup = (
        f"set -e; mkdir -p /root/.apull-test; cp {path} /root/.apull-test/{name}.real; "
        f"cat > /root/.apull-test/{name} <<'EOF'\n{script}EOF\n"
        f"chmod 0755 /root/.apull-test/{name}; mount --bind /root/.apull-test/{name} {path}"
    )
    assert run_on(node1, setup).returncode == 0
    try:
        yield name
    finally:
        run_on(node1, f"umount {path}; rm -rf /root/.apull-test")


def test_an_unserved_node_is_refused_in_preflight_and_left_as_it_was(
    node1: layout.LabNode, faked: str
) -> None:
    before = run_on(node1, STATE).stdout
    result = apull("run", "site", "--no-lab", "--limit", "node1", timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    has = "ppc64le, glibc 2.36" if faked == "uname" else "x86_64, glibc 2.12"
    assert f"no apull build runs on this node: it has {has}, python3 3.11; " in out, out[-3000:]
    assert "supported: x86_64 or aarch64, glibc >= 2.17, python3 3.9-3.13" in out
    # Refused by the first task of the first play: nothing ran after it.
    assert recap(out)["node1"][1:] == (0, 0, 1), out[-3000:]
    assert "Gather apull node facts" not in out
    assert run_on(node1, STATE).stdout == before
