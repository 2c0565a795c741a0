#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""A role's systemd units brought to their state in one round trip: reload, enable, start in
order, restart those whose files changed."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: systemd_units
short_description: Enable, start and restart a role's units in one call
description:
  - Reloads systemd when told to (a unit file changed), enables each unit in I(units) that
    is not enabled, starts each that is not active (in the order given), then restarts
    each unit in I(restart) that this call did not just start (a unit started now already
    runs its new files).
  - A unit that fails to start fails the task with the end of its journal, naming the
    units started before it.
  - In check mode nothing is run but the reads; a unit whose file is not installed yet
    (its role would have written it) counts as to be enabled and started.
  - One call does what a loop of C(ansible.builtin.systemd_service) tasks did.
options:
  units:
    description: Unit names, in start order.
    type: list
    elements: str
    required: true
  enabled:
    description: Enable each unit at boot.
    type: bool
    default: true
  started:
    description: Start each unit that is not active (false leaves their state alone).
    type: bool
    default: true
  daemon_reload:
    description: Run C(systemctl daemon-reload) first.
    type: bool
    default: false
  restart:
    description: Units to restart, unless this call started them.
    type: list
    elements: str
    default: []
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Start and enable the services (apulld first)
  apull.deploy.systemd_units:
    units: [apulld.service, apull-snapshotter.service]
    daemon_reload: "{{ installed.changed }}"
    restart: [apull-snapshotter.service]
"""

RETURN = r"""
enabled:
  description: Units this call enabled (or would).
  returned: always
  type: list
  elements: str
started:
  description: Units this call started (or would).
  returned: always
  type: list
  elements: str
restarted:
  description: Units this call restarted (or would).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

JOURNAL_LINES = 15


class UnitFailed(Exception):
    pass


def systemctl(module, *args):
    return module.run_command(["systemctl", *args])


def act(module, verb, unit=None):
    rc, out, err = systemctl(module, verb, *([unit] if unit else []))
    if rc != 0:
        journal = ""
        if unit:
            _, journal, _ = module.run_command(
                ["journalctl", "-u", unit, "-n", str(JOURNAL_LINES), "--no-pager", "-o", "cat"]
            )
        raise UnitFailed(
            "systemctl %s failed (exit %d): %s\n%s"
            % (
                " ".join([verb] + ([unit] if unit else [])),
                rc,
                (err or out).strip(),
                journal.rstrip(),
            )
        )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            units=dict(type="list", elements="str", required=True),
            enabled=dict(type="bool", default=True),
            started=dict(type="bool", default=True),
            daemon_reload=dict(type="bool", default=False),
            restart=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    params = module.params
    check = module.check_mode
    done = {"enabled": [], "started": [], "restarted": []}
    try:
        if params["daemon_reload"] and not check:
            act(module, "daemon-reload")
        for unit in params["units"]:
            if params["enabled"]:
                _, state, _ = systemctl(module, "is-enabled", unit)
                if state.strip() not in ("enabled", "static", "alias"):
                    if not check:
                        act(module, "enable", unit)
                    done["enabled"].append(unit)
            if params["started"]:
                _, state, _ = systemctl(module, "is-active", unit)
                if state.strip() != "active":
                    if not check:
                        act(module, "start", unit)
                    done["started"].append(unit)
        for unit in params["restart"]:
            if unit not in done["started"]:
                if not check:
                    act(module, "restart", unit)
                done["restarted"].append(unit)
    except UnitFailed as exc:
        module.fail_json(
            msg="%s\n(done before it: %s)"
            % (
                exc,
                ", ".join("%s %s" % (k, " ".join(v)) for k, v in done.items() if v) or "nothing",
            ),
            changed=any(done.values()),
            **done,
        )
    module.exit_json(changed=any(done.values()), **done)


if __name__ == "__main__":
    main()
