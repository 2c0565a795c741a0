#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Wait until the stack answers on a node: apulld's ping, containerd's plugin list, a real
List call through the snapshotter."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: stack_health
short_description: Wait until apulld and the snapshotter answer, in one call
description:
  - Asks, every I(delay) seconds until it answers or I(timeout) runs out for it
    - C(apulld) - apulld's C(PUT /v1.0/apulld/ping) over its socket (the answer is returned);
    - C(plugin) - C(ctr plugins ls) lists the snapshotter as C(ok);
    - C(snapshots) - C(ctr snapshots --snapshotter NAME ls) succeeds (containerd reaches the
      snapshotter's socket, a real List call).
  - The checks are asked in that order, each once the one before it answered.
  - On timeout it fails, naming the check that did not answer and its last error.
  - One call does what three retried tasks (C(ansible.builtin.uri) with C(unix_socket) and
    two C(ansible.builtin.command)) did. It reads only, so it runs in check mode too.
options:
  checks:
    description: Which checks, of C(apulld), C(plugin) and C(snapshots).
    type: list
    elements: str
    default: [apulld, plugin, snapshots]
  apulld_address:
    description: apulld's socket.
    type: path
    default: /run/apulld.sock
  containerd_address:
    description: containerd's socket (C(ctr --address)).
    type: path
    default: /run/containerd/containerd.sock
  snapshotter:
    description: The proxy snapshotter's name in containerd's config.
    type: str
    default: apull
  timeout:
    description: Seconds to wait for each check.
    type: float
    default: 60
  delay:
    description: Seconds between two tries of a check.
    type: float
    default: 3
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Check the services answer
  apull.deploy.stack_health:
    timeout: 60
  register: health
"""

RETURN = r"""
ping:
  description: apulld's answer to its ping (version, backend, reasons, ...), when asked.
  returned: always
  type: dict
plugin:
  description: The snapshotter's line in C(ctr plugins ls), when asked.
  returned: always
  type: str
seconds:
  description: How long the checks took.
  returned: always
  type: float
"""

import re
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.apull.deploy.plugins.module_utils.apulld_socket import ping

CHECKS = ("apulld", "plugin", "snapshots")


def plugin_line(output, name):
    """The snapshotter's `ctr plugins ls` line, or None."""
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "io.containerd.snapshotter.v1" and fields[1] == name:
            return " ".join(fields)
    return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            checks=dict(type="list", elements="str", default=list(CHECKS)),
            apulld_address=dict(type="path", default="/run/apulld.sock"),
            containerd_address=dict(type="path", default="/run/containerd/containerd.sock"),
            snapshotter=dict(type="str", default="apull"),
            timeout=dict(type="float", default=60.0),
            delay=dict(type="float", default=3.0),
        ),
        supports_check_mode=True,
    )
    params = module.params
    unknown = [c for c in params["checks"] if c not in CHECKS]
    if unknown:
        module.fail_json(msg="unknown checks %s (known: %s)" % (unknown, ", ".join(CHECKS)))
    ctr = ["ctr", "--address", params["containerd_address"]]
    name = params["snapshotter"]
    started = time.monotonic()
    result = {"ping": {}, "plugin": ""}

    def ask(check):
        """None when the check answered, else why not."""
        if check == "apulld":
            answer, why = ping(params["apulld_address"])
            if answer is not None:
                result["ping"] = answer
            return why
        if check == "plugin":
            rc, out, err = module.run_command([*ctr, "plugins", "ls"])
            line = plugin_line(out, name) if rc == 0 else None
            if line is None:
                return "ctr plugins ls lists no snapshotter %s (exit %d) %s" % (
                    name,
                    rc,
                    err.strip(),
                )
            result["plugin"] = line
            if not re.search(r"\sok$", line):
                return "ctr plugins ls: %s" % line
            return None
        rc, _, err = module.run_command([*ctr, "snapshots", "--snapshotter", name, "ls"])
        return None if rc == 0 else "ctr snapshots --snapshotter %s ls: %s" % (name, err.strip())

    for check in [c for c in CHECKS if c in params["checks"]]:
        deadline = time.monotonic() + params["timeout"]
        while True:
            why = ask(check)
            if why is None:
                break
            if time.monotonic() + params["delay"] > deadline:
                module.fail_json(
                    msg="%s did not answer in %g s: %s" % (check, params["timeout"], why),
                    seconds=round(time.monotonic() - started, 1),
                    **result,
                )
            time.sleep(params["delay"])
    module.exit_json(changed=False, seconds=round(time.monotonic() - started, 1), **result)


if __name__ == "__main__":
    main()
