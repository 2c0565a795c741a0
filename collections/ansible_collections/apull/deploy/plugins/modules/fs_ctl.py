#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Open the EulerOS fs_ctl gate for EROFS and cachefiles on-demand."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: fs_ctl
short_description: Set the EulerOS fs_ctl gate parameters to Y
description:
  - EulerOS and openEuler kernels gate EROFS and cachefiles on-demand mode behind
    C(/sys/module/fs_ctl/parameters/{erofs_enabled,cachefiles_ondemand_enabled}). They read
    C(N) after boot, C(Y) after writing C(1), cannot be turned off again and are lost at reboot.
  - Writes C(1) to each parameter that is not C(Y) yet and reads it back.
  - Does nothing, and says so, on kernels without C(fs_ctl).
options:
  params:
    description: Parameters to open.
    type: list
    elements: str
    default: [erofs_enabled, cachefiles_ondemand_enabled]
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Open the fs_ctl gate
  apull.deploy.fs_ctl:
"""

RETURN = r"""
present:
  description: Whether the kernel has the fs_ctl gate.
  returned: always
  type: bool
values:
  description: Each parameter's value after the run (or now, in check mode).
  returned: always
  type: dict
opened:
  description: Parameters this run set (or would set, in check mode).
  returned: always
  type: list
  elements: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

BASE = "/sys/module/fs_ctl/parameters"


def read(name):
    with open(os.path.join(BASE, name)) as handle:
        return handle.read().strip()


def main():
    module = AnsibleModule(
        argument_spec=dict(
            params=dict(
                type="list",
                elements="str",
                default=["erofs_enabled", "cachefiles_ondemand_enabled"],
            ),
        ),
        supports_check_mode=True,
    )
    if not os.path.isdir(BASE):
        module.exit_json(changed=False, present=False, values={}, opened=[])
    names = module.params["params"]
    unknown = [n for n in names if not os.path.exists(os.path.join(BASE, n))]
    if unknown:
        module.fail_json(msg="fs_ctl has no parameter %s" % ", ".join(unknown))
    closed = [n for n in names if read(n) != "Y"]
    if not module.check_mode:
        for name in closed:
            try:
                with open(os.path.join(BASE, name), "w") as handle:
                    handle.write("1")
            except (IOError, OSError) as exc:
                module.fail_json(msg="writing 1 to %s/%s failed: %s" % (BASE, name, exc))
    values = dict((n, read(n)) for n in names)
    if not module.check_mode:
        still = [n for n in names if values[n] != "Y"]
        if still:
            module.fail_json(
                msg="fs_ctl %s still not Y after writing 1" % ", ".join(still), values=values
            )
    module.exit_json(changed=bool(closed), present=True, values=values, opened=closed)


if __name__ == "__main__":
    main()
