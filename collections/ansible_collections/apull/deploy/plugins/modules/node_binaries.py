#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Documentation of the node_binaries action (the work is done by the action plugin)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node_binaries
short_description: Install the apull node binaries from the suite's bundle
description:
  - Builds the bundle on the controller when it is missing or stale (C(apull bundle)), then
    compares each binary's sha256 with the node's and sends only those that differ.
  - Each binary is uploaded next to its destination under a temporary name, checked against
    the manifest's sha256, given its mode and renamed into place; the replaced one is kept in
    C(/var/lib/apull/previous) so C(apull sync-bin --rollback) can put it back.
  - The same logic as C(apull sync-bin) (the Python package C(apull.sync)); this is its
    transport over Ansible's connection.
  - Check mode reports what would be sent, with C(--diff) the sha256 before and after.
options:
  bundle_dir:
    description: The bundle directory on the controller (default the suite's build/bundle).
    type: path
  prebuilt:
    description:
      - Send the bundle in O(bundle_dir) as it is, checked against its manifest, instead of
        building it from the suite's sources when stale (the chart's image carries a
        prebuilt bundle and no build tools).
    type: bool
    default: false
  restart:
    description:
      - Restart, on the node, the running services whose binary changed.
      - Off by default; the C(apull) role restarts from its own list (C(restart_needed)).
    type: bool
    default: false
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Install the node binaries
  apull.deploy.node_binaries:
  register: binaries
"""

RETURN = r"""
binaries:
  description: Per binary, the action taken and the sha256 installed.
  returned: always
  type: dict
restart_needed:
  description: Services whose binary changed (running or not).
  returned: always
  type: list
  elements: str
restarted:
  description: Services restarted (only with restart=true).
  returned: always
  type: list
  elements: str
bundle:
  description: Version and fingerprint of the bundle.
  returned: always
  type: dict
"""
