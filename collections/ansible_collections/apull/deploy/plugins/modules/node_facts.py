#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Gather, in one round trip, what apull needs to know about a node's kernel and runtime."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: node_facts
short_description: Facts about a node's EROFS, fscache on-demand and containerd state
description:
  - Reads the kernel release, architecture, page size, the state of the C(erofs) and
    C(cachefiles) modules, the EulerOS C(fs_ctl) gate parameters, C(/dev/cachefiles) and the
    containerd version, without changing anything.
  - Returns them as C(ansible_facts.apull_node).
options: {}
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Gather apull node facts
  apull.deploy.node_facts:
"""

RETURN = r"""
ansible_facts:
  description: Facts under the key C(apull_node).
  returned: always
  type: dict
  contains:
    apull_node:
      description: kernel, arch, page_size, os, erofs, cachefiles, fs_ctl, ondemand, containerd.
      type: dict
"""

import os
import platform
import re
import subprocess

from ansible.module_utils.basic import AnsibleModule

FS_CTL = "/sys/module/fs_ctl/parameters"
FS_CTL_PARAMS = ("erofs_enabled", "cachefiles_ondemand_enabled")


def read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def module_state(name):
    """loaded, available (can be loaded), builtin, or missing."""
    if os.path.isdir("/sys/module/" + name + "/sections") or os.path.isdir(
        "/sys/module/" + name + "/holders"
    ):
        return "loaded"
    release = platform.release()
    builtin = read("/lib/modules/%s/modules.builtin" % release) or ""
    if re.search(r"/%s\.ko" % re.escape(name), builtin):
        return "builtin"
    dep = read("/lib/modules/%s/modules.dep" % release) or ""
    if re.search(r"(^|/)%s\.ko(\.[a-z]+)?:" % re.escape(name), dep, re.M):
        return "available"
    return "missing"


def kernel_config(option):
    text = read("/boot/config-" + platform.release()) or ""
    match = re.search(r"^%s=(\S+)" % re.escape(option), text, re.M)
    return match.group(1) if match else None


def containerd_version():
    try:
        out = subprocess.run(
            ["containerd", "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return None
    match = re.search(r"\sv?(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else None


def os_release():
    data = {}
    for line in (read("/etc/os-release") or "").splitlines():
        key, _, value = line.partition("=")
        data[key] = value.strip('"')
    return data


def ondemand_summary(fs_ctl, cachefiles_mod):
    """A short, truthful word for the status table; preflight does the full detection."""
    if fs_ctl:
        if all(fs_ctl.get(p) == "Y" for p in FS_CTL_PARAMS):
            return "enabled"
        return "gated (fs_ctl N)"
    if kernel_config("CONFIG_CACHEFILES_ONDEMAND") == "y":
        return "supported"
    if cachefiles_mod == "missing":
        return "no cachefiles"
    return "unsupported"


def main():
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    fs_ctl = None
    if os.path.isdir(FS_CTL):
        fs_ctl = {p: read(os.path.join(FS_CTL, p)) for p in FS_CTL_PARAMS}
    erofs = module_state("erofs")
    cachefiles = module_state("cachefiles")
    osr = os_release()
    facts = {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "os": {"id": osr.get("ID"), "version": osr.get("VERSION_ID"),
               "pretty": osr.get("PRETTY_NAME")},
        "erofs": erofs,
        "cachefiles": cachefiles,
        "fs_ctl": fs_ctl,
        "dev_cachefiles": os.path.exists("/dev/cachefiles"),
        "ondemand": ondemand_summary(fs_ctl, cachefiles),
        "containerd": containerd_version(),
    }
    module.exit_json(changed=False, ansible_facts={"apull_node": facts})


if __name__ == "__main__":
    main()
