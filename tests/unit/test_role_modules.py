"""The modules the roles and playbooks use are safe to run one after another in one
interpreter (Mitogen's "overlapped" task isolation, inventory/group_vars/all.yml)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Modules known to change the interpreter they run in for the modules after them.
LEAKY = {
    "ansible.builtin.uri": "its unix_socket patch of http.client sent the next module's "
    "HTTP to that socket; use apull.deploy.stack_health (apulld) or a module of our own",
}
#: A task's module: its fully qualified name, or a short one (`uri:`), at a task's keys.
TASK_MODULE = re.compile(r"^\s*-?\s*((?:[a-z0-9_]+\.[a-z0-9_]+\.)?[a-z0-9_]+):", re.M)
SHORT = {name.rsplit(".", 1)[1]: name for name in LEAKY}


def used_modules() -> dict[str, set[Path]]:
    found: dict[str, set[Path]] = {}
    paths = [*ROOT.glob("roles/*/tasks/*.yml"), *ROOT.glob("roles/*/handlers/*.yml"),
             *ROOT.glob("playbooks/*.yml")]  # fmt: skip
    for path in paths:
        for name in TASK_MODULE.findall(path.read_text()):
            name = SHORT.get(name, name)
            found.setdefault(name, set()).add(path.relative_to(ROOT))
    return found


def test_the_scan_sees_the_roles_modules() -> None:
    used = used_modules()
    assert {"apull.deploy.node_facts", "apull.deploy.stack_health",
            "ansible.builtin.command"} <= set(used)  # fmt: skip


def test_no_role_or_playbook_uses_a_module_that_leaks_into_the_next() -> None:
    used = used_modules()
    leaks = {name: sorted(map(str, used[name])) for name in LEAKY if name in used}
    assert not leaks, "; ".join(f"{n} in {', '.join(p)}: {LEAKY[n]}" for n, p in leaks.items())
