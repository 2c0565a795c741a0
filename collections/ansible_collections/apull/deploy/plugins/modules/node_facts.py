#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Gather, in one round trip, what apull needs to know about a node, and what is missing."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node_facts
short_description: Facts about a node's EROFS / fscache on-demand support, containerd and disk
description:
  - Detects on-demand loading support in this order - the EulerOS C(fs_ctl) gate parameters,
    the kernel configuration, the C(cachefiles) and C(erofs) modules, C(/dev/cachefiles) and
    whoever holds it, the page size, a functional C(bind ondemand) probe (only when nothing
    holds the device), and finally EROFS file-backed mounts with FUSE as the fallback backend.
  - Also reads the kernel release, OS, architecture, containerd version, free disk under the
    data directories and whether the registry answers C(GET /v2/).
  - Leaves the node as it found it - modules it loads for the probe are unloaded again.
  - Returns C(ansible_facts.apull_node), including C(problems), the requirements not met,
    each with the fix.
options:
  registry:
    description: Registry C(host:port) to check; empty skips the check.
    type: str
    default: ""
  registry_insecure:
    description: Use plain HTTP for the registry check.
    type: bool
    default: false
  data_dirs:
    description: Directories whose file system needs free space (nearest existing parent).
    type: list
    elements: path
    default: [/var/lib/containerd-apull, /var/lib/containerd]
  block_size:
    description: EROFS block size of converted images; fscache mode needs it equal to the page size.
    type: int
    default: 4096
  probe:
    description: Run the functional C(bind ondemand) probe when no process holds the device.
    type: bool
    default: true
  kernel_min:
    description: Oldest kernel release that qualifies.
    type: str
    default: "5.10"
  containerd_min:
    description: Oldest containerd that qualifies.
    type: str
    default: "1.6.14"
  min_free_mb:
    description: Free space needed under each data directory, in MiB.
    type: int
    default: 1024
  require_enabled:
    description: Count a closed C(fs_ctl) gate or unloaded modules as problems (after deployment).
    type: bool
    default: false
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Gather apull node facts
  apull.deploy.node_facts:
    registry: registry.example.com:5000
"""

RETURN = r"""
ansible_facts:
  description: Facts under the key C(apull_node).
  returned: always
  type: dict
  contains:
    apull_node:
      description: >-
        kernel, arch, page_size, os, containerd, erofs, cachefiles, fs_ctl, kconfig,
        dev_cachefiles, holder, probe, backend, ondemand, disk, registry, problems.
      type: dict
"""

import errno
import os
import platform
import re
import shutil
import ssl
import subprocess
import tempfile

try:
    from urllib.error import HTTPError, URLError
    from urllib.request import urlopen
except ImportError:  # pragma: no cover - Python 2 nodes
    from urllib2 import HTTPError, URLError, urlopen

from ansible.module_utils.basic import AnsibleModule

FS_CTL = "/sys/module/fs_ctl/parameters"
FS_CTL_PARAMS = ("erofs_enabled", "cachefiles_ondemand_enabled")
KCONFIG = (
    "CONFIG_CACHEFILES_ONDEMAND",
    "CONFIG_EROFS_FS_ONDEMAND",
    "CONFIG_EROFS_FS_BACKED_BY_FILE",
)
FIX_KERNEL = "ansible-playbook playbooks/kernel.yml (part of make all)"
FIX_FSCACHE = "ansible-playbook playbooks/fscache.yml (part of make all)"


def read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except (IOError, OSError):
        return None


def version_tuple(text):
    return tuple(int(n) for n in re.findall(r"\d+", text or "")[:3]) or (0,)


def module_state(name):
    """loaded, builtin, available (can be loaded) or missing."""
    if os.path.isdir("/sys/module/%s/sections" % name):
        return "loaded"
    release = platform.release()
    builtin = read("/lib/modules/%s/modules.builtin" % release) or ""
    if re.search(r"/%s\.ko" % re.escape(name), builtin):
        return "builtin"
    dep = read("/lib/modules/%s/modules.dep" % release) or ""
    if re.search(r"(^|/)%s\.ko(\.[a-z]+)?:" % re.escape(name), dep, re.M):
        return "available"
    return "missing"


def kernel_config():
    text = read("/boot/config-" + platform.release())
    if text is None and os.path.exists("/proc/config.gz"):
        import gzip

        with gzip.open("/proc/config.gz", "rt") as handle:
            text = handle.read()
    found = {}
    for option in KCONFIG:
        match = re.search(r"^%s=(\S+)" % option, text or "", re.M)
        found[option] = match.group(1) if match else None
    return found


def containerd_version():
    try:
        out = subprocess.run(
            ["containerd", "--version"],
            stdout=subprocess.PIPE,
            universal_newlines=True,
            timeout=30,
            check=False,
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
    return {
        "id": data.get("ID"),
        "version": data.get("VERSION_ID"),
        "pretty": data.get("PRETTY_NAME"),
        "like": data.get("ID_LIKE", ""),
    }


def device_holder(device="/dev/cachefiles"):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = "/proc/%s/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == device:
                    return {"pid": int(pid), "comm": read("/proc/%s/comm" % pid)}
            except OSError:
                continue
    return None


def modprobe(name, remove=False):
    cmd = ["modprobe", "-r", name] if remove else ["modprobe", name]
    return (
        subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False).returncode
        == 0
    )


def bind_probe():
    """accepted, or rejected: ERRNO."""
    try:
        fd = os.open("/dev/cachefiles", os.O_RDWR)
    except OSError as exc:
        return "skipped: open failed: %s" % errno.errorcode.get(exc.errno, exc.errno)
    cache = tempfile.mkdtemp(prefix="apull-probe-", dir="/var/tmp")
    try:
        os.write(fd, ("dir " + cache).encode())
        os.write(fd, b"bind ondemand")
        return "accepted"
    except OSError as exc:
        return "rejected: %s" % errno.errorcode.get(exc.errno, exc.errno)
    finally:
        os.close(fd)
        shutil.rmtree(cache, ignore_errors=True)


def free_mb(path):
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    st = os.statvfs(path)
    return path, st.f_bavail * st.f_frsize // (1024 * 1024)


def registry_check(registry, insecure):
    if not registry:
        return {"address": "", "reachable": None, "detail": "not configured"}
    url = "%s://%s/v2/" % ("http" if insecure else "https", registry)
    kwargs = {"timeout": 10}
    if not insecure:
        kwargs["context"] = ssl.create_default_context()
    try:
        status = urlopen(url, **kwargs).getcode()
    except HTTPError as exc:
        status = exc.code
    except (URLError, OSError) as exc:
        return {"address": registry, "reachable": False, "detail": str(getattr(exc, "reason", exc))}
    return {"address": registry, "reachable": status in (200, 401), "detail": "HTTP %s" % status}


def detect(params):
    facts = {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "os": os_release(),
        "containerd": containerd_version(),
        "kconfig": kernel_config(),
        "fuse": os.path.exists("/dev/fuse"),
    }
    fs_ctl = None
    if os.path.isdir(FS_CTL):
        fs_ctl = dict((p, read(os.path.join(FS_CTL, p))) for p in FS_CTL_PARAMS)
    facts["fs_ctl"] = fs_ctl
    facts["erofs"] = module_state("erofs")
    facts["cachefiles"] = module_state("cachefiles")

    loaded_for_probe = []
    for name in ("cachefiles", "erofs"):
        if facts[name] == "available" and params["probe"] and modprobe(name):
            loaded_for_probe.append(name)
    try:
        facts["erofs_registered"] = bool(
            re.search(r"\serofs$", read("/proc/filesystems") or "", re.M)
        )
        facts["dev_cachefiles"] = os.path.exists("/dev/cachefiles")
        facts["holder"] = device_holder() if facts["dev_cachefiles"] else None
        if not params["probe"]:
            facts["probe"] = "skipped: disabled"
        elif not facts["dev_cachefiles"]:
            facts["probe"] = "skipped: no /dev/cachefiles"
        elif facts["holder"]:
            facts["probe"] = "skipped: held by %s[%s]" % (
                facts["holder"]["comm"],
                facts["holder"]["pid"],
            )
        else:
            facts["probe"] = bind_probe()
    finally:
        for name in reversed(loaded_for_probe):
            modprobe(name, remove=True)

    facts["backend"], facts["ondemand"] = backend(facts, params["block_size"])
    facts["disk"] = [
        dict(zip(("path", "free_mb"), free_mb(d)), wanted=d) for d in params["data_dirs"]
    ]
    facts["registry"] = registry_check(params["registry"], params["registry_insecure"])
    facts["problems"] = problems(facts, params)
    return facts


def backend(facts, block_size):
    """(backend, on-demand state) from what was detected."""
    fs_ctl = facts["fs_ctl"]
    kconfig = facts["kconfig"]
    holder = facts["holder"]
    page_ok = facts["page_size"] == block_size
    if fs_ctl:
        # EulerOS / openEuler: the gate exists only on kernels carrying on-demand support.
        ondemand = "enabled" if all(fs_ctl.get(p) == "Y" for p in FS_CTL_PARAMS) else "gated"
    elif facts["probe"] == "accepted":
        ondemand = "supported"
    elif holder and holder.get("comm") == "apulld":
        ondemand = "in use by apulld"
    elif holder:
        ondemand = "held by " + str(holder.get("comm"))
    elif facts["probe"].startswith("rejected"):
        ondemand = "unsupported"
    elif (
        kconfig.get("CONFIG_CACHEFILES_ONDEMAND") == "y"
        and kconfig.get("CONFIG_EROFS_FS_ONDEMAND") == "y"
    ):
        ondemand = "supported (kernel config)"
    else:
        ondemand = "unsupported"
    fscache_ok = ondemand in (
        "enabled",
        "gated",
        "supported",
        "in use by apulld",
        "supported (kernel config)",
    )
    if fscache_ok and page_ok and facts["erofs"] != "missing" and facts["cachefiles"] != "missing":
        return "fscache", ondemand
    if kconfig.get("CONFIG_EROFS_FS_BACKED_BY_FILE") == "y" and facts["fuse"]:
        return "file-backed", ondemand
    return "none", ondemand


def problems(facts, params):
    found = []

    def add(what, fix):
        found.append({"what": what, "fix": fix})

    if version_tuple(facts["kernel"]) < version_tuple(params["kernel_min"]):
        add("kernel %s is older than %s" % (facts["kernel"], params["kernel_min"]), FIX_KERNEL)
    if facts["holder"] and facts["holder"].get("comm") == "cachefilesd":
        add(
            "cachefilesd holds /dev/cachefiles (pid %s)" % facts["holder"]["pid"],
            "systemctl disable --now cachefilesd",
        )
    elif facts["backend"] == "none":
        detail = facts["probe"]
        if facts["page_size"] != params["block_size"] and facts["ondemand"] != "unsupported":
            detail = "page size %s != EROFS block size %s" % (
                facts["page_size"],
                params["block_size"],
            )
        add(
            "no usable backend: fscache on-demand %s (%s), no EROFS file-backed mounts"
            % (facts["ondemand"], detail),
            FIX_KERNEL,
        )
    if params["require_enabled"] and facts["backend"] == "fscache":
        closed = [p for p, v in (facts["fs_ctl"] or {}).items() if v != "Y"]
        if closed:
            add("fs_ctl gate closed: %s" % ", ".join(closed), FIX_FSCACHE)
        for name in ("cachefiles", "erofs"):
            if facts[name] not in ("loaded", "builtin"):
                add("module %s not loaded" % name, FIX_FSCACHE)
    if facts["containerd"] is None:
        add("containerd is not installed", "install containerd >= %s" % params["containerd_min"])
    elif version_tuple(facts["containerd"]) < version_tuple(params["containerd_min"]):
        add(
            "containerd %s is older than %s" % (facts["containerd"], params["containerd_min"]),
            "upgrade containerd to >= %s" % params["containerd_min"],
        )
    for disk in facts["disk"]:
        if disk["free_mb"] < params["min_free_mb"]:
            add(
                "%s MiB free under %s (< %s MiB)"
                % (disk["free_mb"], disk["path"], params["min_free_mb"]),
                "free space under " + disk["path"],
            )
    if facts["registry"]["reachable"] is False:
        add(
            "registry %s unreachable: %s"
            % (facts["registry"]["address"], facts["registry"]["detail"]),
            "check REGISTRY in config.txt and the node's route/firewall to it",
        )
    return found


def main():
    module = AnsibleModule(
        argument_spec=dict(
            registry=dict(type="str", default=""),
            registry_insecure=dict(type="bool", default=False),
            data_dirs=dict(
                type="list",
                elements="path",
                default=["/var/lib/containerd-apull", "/var/lib/containerd"],
            ),
            block_size=dict(type="int", default=4096),
            probe=dict(type="bool", default=True),
            kernel_min=dict(type="str", default="5.10"),
            containerd_min=dict(type="str", default="1.6.14"),
            min_free_mb=dict(type="int", default=1024),
            require_enabled=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.exit_json(changed=False, ansible_facts={"apull_node": detect(module.params)})


if __name__ == "__main__":
    main()
