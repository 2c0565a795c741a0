#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Documentation of the node_platform action (the work is done by the action plugin)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node_platform
short_description: Read what the apull node binaries would run on, and whether a build serves it
description:
  - Reads, in one round trip of plain C(sh), the node's architecture (C(uname -m)), its glibc
    (C(getconf GNU_LIBC_VERSION)) and C(/usr/bin/python3)'s version - the interpreter the
    node binaries run on. Runs no module and changes nothing.
  - Decides on the controller, from the suite's bundle definition (C(apull.bundle)), whether a
    build of every binary serves that node - the same probe and the same decision as the
    installers (C(apull sync-bin), the C(apull) role).
  - Fails, before anything else reads or changes the node, when none does, naming what the
    node has and what is supported.
options:
  enforce:
    description: Fail a node that no build serves (otherwise only report it).
    type: bool
    default: true
attributes:
  check_mode:
    support: full
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Check a build of the node binaries serves this node
  apull.deploy.node_platform:
"""

RETURN = r"""
ansible_facts:
  description: Facts under the key C(apull_platform).
  returned: always
  type: dict
  contains:
    apull_platform:
      description: >-
        arch, glibc, python (C(/usr/bin/python3)'s X.Y, empty when there is none), text (all
        three in one line), supported (bool), why (the refusal, empty when supported).
      type: dict
"""
