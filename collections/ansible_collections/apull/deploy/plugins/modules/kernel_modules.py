#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Load kernel modules, with a check mode that tells the truth."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: kernel_modules
short_description: Make sure kernel modules are loaded
description:
  - Loads each module with C(modprobe) unless it is already loaded or built in.
  - In check mode, reports which modules would be loaded and loads nothing.
options:
  names:
    description: Module names, loaded in this order.
    type: list
    elements: str
    required: true
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Load cachefiles and erofs
  apull.deploy.kernel_modules:
    names: [cachefiles, erofs]
"""

RETURN = r"""
loaded:
  description: Modules this run loaded (or would load, in check mode).
  returned: always
  type: list
  elements: str
"""

import os
import platform
import re

from ansible.module_utils.basic import AnsibleModule


def is_present(name):
    if os.path.isdir("/sys/module/%s/sections" % name):
        return True
    try:
        with open("/lib/modules/%s/modules.builtin" % platform.release()) as handle:
            return re.search(r"/%s\.ko" % re.escape(name), handle.read()) is not None
    except (IOError, OSError):
        return False


def main():
    module = AnsibleModule(
        argument_spec=dict(names=dict(type="list", elements="str", required=True)),
        supports_check_mode=True,
    )
    missing = [n for n in module.params["names"] if not is_present(n)]
    if module.check_mode or not missing:
        module.exit_json(changed=bool(missing), loaded=missing)
    for name in missing:
        rc, _, err = module.run_command(["modprobe", name])
        if rc != 0:
            module.fail_json(msg="modprobe %s failed: %s" % (name, err.strip()), loaded=[])
    module.exit_json(changed=True, loaded=missing)


if __name__ == "__main__":
    main()
