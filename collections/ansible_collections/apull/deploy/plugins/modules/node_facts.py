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
    a functional C(bind ondemand) probe (only when nothing holds the device), whoever holds
    C(/dev/cachefiles) (apulld), the C(cachefiles) and C(erofs) modules themselves (the
    on-demand functions in the running kernel's C(/proc/kallsyms), else in the module files
    modprobe would load), and last the kernel configuration; then the page size, and EROFS
    file-backed mounts with FUSE as the fallback backend.
  - C(ondemand_source) names the evidence that decided, and C(ondemand_note) says so when
    the kernel configuration contradicts the verdict - for example a config without
    C(CONFIG_CACHEFILES_ONDEMAND) next to modules rebuilt with it outside the kernel
    (C(/lib/modules/<release>/updates/)).
  - The backend (C(fscache), C(file) or C(none)) is decided as apulld decides it (auto) - when
    apulld runs, its own answer (C(PUT /v1.0/apulld/ping)); when it is installed and stopped,
    C(apulld --check-backend); before it is installed, from the facts above. C(fscache) counts
    a closed C(fs_ctl) gate as available, since the fscache step opens it.
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
  apulld_address:
    description: apulld's API socket, asked for the backend when apulld runs.
    type: path
    default: /run/apulld.sock
  apulld_binary:
    description: apulld, run with C(--check-backend) when installed but not running.
    type: path
    default: /usr/bin/apulld
  apulld_config:
    description: >-
      apulld's settings; C(--check-backend) is asked only when they exist (the apull role
      wrote them and created the cache directory).
    type: path
    default: /etc/apull/config.toml
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
        kernel, arch, page_size, os, containerd, erofs, cachefiles, modules (per module -
        file, rebuilt outside the kernel, has the on-demand code, where that was seen),
        fs_ctl, kconfig, dev_cachefiles, holder, probe, backend (fscache, file or none),
        backend_why (the reason, never cut), backend_reasons (apulld's reasons, one per
        backend tried), backend_source (apulld, apulld --check-backend or kernel facts),
        ondemand, ondemand_source (fs_ctl gate, bind probe, apulld, /dev/cachefiles holder,
        modules (...), kernel config or no evidence), ondemand_note (why the kernel config
        does not decide, or empty), disk, registry, problems.
      type: dict
"""

import errno
import os
import platform
import re
import shutil
import ssl
import stat
import subprocess
import tempfile

try:
    from urllib.error import HTTPError, URLError
    from urllib.request import urlopen
except ImportError:  # pragma: no cover - Python 2 nodes
    from urllib2 import HTTPError, URLError, urlopen  # novermin

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.apull.deploy.plugins.module_utils.apulld_socket import ping

FS_CTL = "/sys/module/fs_ctl/parameters"
FS_CTL_PARAMS = ("erofs_enabled", "cachefiles_ondemand_enabled")
KCONFIG = (
    "CONFIG_CACHEFILES_ONDEMAND",
    "CONFIG_EROFS_FS_ONDEMAND",
    "CONFIG_EROFS_FS_BACKED_BY_FILE",
)
ONDEMAND_OPTIONS = ("CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EROFS_FS_ONDEMAND")
# A function only a module built with on-demand support has (the lab's
# build-ondemand-modules.sh checks its rebuilt modules for the same two).
ONDEMAND_SYMBOLS = (
    ("cachefiles", "cachefiles_ondemand_init_object"),
    ("erofs", "erofs_fscache_register_fs"),
)
# On-demand states with which the fscache backend is available.
FSCACHE_STATES = (
    "enabled",
    "gated",
    "supported",
    "in use by apulld",
    "supported (modules)",
    "supported (kernel config)",
)
FIX_KERNEL = "ansible-playbook playbooks/kernel.yml (part of make all)"
FIX_FSCACHE = "ansible-playbook playbooks/fscache.yml (part of make all)"


def is_char_device(path):
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


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


def module_file(name, release=None, root="/lib/modules"):
    """The file modprobe loads for the module (depmod lists updates/ ahead of kernel/), or
    None when modules.dep does not list it."""
    base = "%s/%s" % (root, release or platform.release())
    dep = read(base + "/modules.dep") or ""
    match = re.search(r"^((?:\S*/)?%s\.ko(?:\.[a-z]+)?):" % re.escape(name), dep, re.M)
    if not match:
        return None
    path = match.group(1)
    return path if path.startswith("/") else "%s/%s" % (base, path)


def rebuilt_outside_the_kernel(path, release=None, root="/lib/modules"):
    """True for a module file outside the kernel package's own kernel/ tree (updates/,
    extra/, weak-updates/: rebuilt or added later)."""
    base = "%s/%s/" % (root, release or platform.release())
    if not path.startswith(base):
        return False
    return path[len(base) :].split("/", 1)[0] != "kernel"


def file_has_symbol(path, symbol):
    """Whether the module file's symbol table names `symbol`; None when it cannot be read
    (unreadable, or compressed in a way the standard library cannot open)."""
    try:
        if path.endswith(".xz"):
            import lzma

            with lzma.open(path) as handle:
                data = handle.read()
        elif path.endswith(".gz"):
            import gzip

            with gzip.open(path) as handle:
                data = handle.read()
        elif path.endswith(".ko"):
            with open(path, "rb") as handle:
                data = handle.read()
        else:
            return None
    except (ImportError, IOError, OSError, EOFError, ValueError):
        return None
    return (b"\0" + symbol.encode() + b"\0") in data


def kallsyms_has(symbols, path="/proc/kallsyms"):
    """{symbol: whether the running kernel (or a loaded module) has it}, or None when the
    kernel's symbol list cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (IOError, OSError):
        return None
    if not data:
        return None
    return dict(
        (s, re.search(rb"\s" + re.escape(s.encode()) + rb"(\s|$)", data, re.M) is not None)
        for s in symbols
    )


def module_support(states, release=None, root="/lib/modules", kallsyms="/proc/kallsyms"):
    """Per module (cachefiles, erofs): the file modprobe loads, whether it was rebuilt outside
    the kernel, and whether it has the on-demand code (None: not known) as seen in the running
    kernel's /proc/kallsyms (loaded or built in), else in that file."""
    symbols = None
    if any(states[name] in ("loaded", "builtin") for name, _ in ONDEMAND_SYMBOLS):
        symbols = kallsyms_has([symbol for _, symbol in ONDEMAND_SYMBOLS], kallsyms)
    found = {}
    for name, symbol in ONDEMAND_SYMBOLS:
        path = None if states[name] == "builtin" else module_file(name, release, root)
        info = {
            "file": path,
            "rebuilt": bool(path) and rebuilt_outside_the_kernel(path, release, root),
            "ondemand": None,
            "seen_in": None,
        }
        if states[name] in ("loaded", "builtin") and symbols is not None:
            info["ondemand"], info["seen_in"] = symbols[symbol], kallsyms
        elif path and states[name] != "missing":
            has = file_has_symbol(path, symbol)
            if has is not None:
                info["ondemand"], info["seen_in"] = has, path
        found[name] = info
    return found


def kernel_config():
    """{option: value or None}; None for every option when no kernel config is readable."""
    text = None
    if os.path.exists("/proc/config.gz"):
        import gzip

        try:
            with gzip.open("/proc/config.gz", "rt") as handle:
                text = handle.read()
        except (IOError, OSError):
            text = None
    if text is None:
        text = read("/boot/config-" + platform.release())
    if text is None:
        return dict.fromkeys(KCONFIG)
    found = {}
    for option in KCONFIG:
        match = re.search(r"^%s=(\S+)" % option, text, re.M)
        # "n" for an option the readable config does not set, as apulld reads it.
        found[option] = match.group(1) if match else "n"
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
    """The process serving the device. systemd (pid 1) also holds it when apulld keeps its fd
    in the service's fd store: it is named only when nothing else holds the device."""
    found = []
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
                    found.append({"pid": int(pid), "comm": read("/proc/%s/comm" % pid)})
                    break
            except OSError:
                continue
    serving = [h for h in found if h["pid"] != 1]
    return (serving or found or [None])[0]


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


def apulld_ping(address):
    """apulld's own answer ({"backend", "reasons", ...}) over its socket, or None."""
    return ping(address)[0]


def apulld_check_backend(binary):
    """(backend, reasons) from `apulld --check-backend`, or None when it cannot run."""
    if not os.access(binary, os.X_OK):
        return None
    try:
        proc = subprocess.run(
            [binary, "--check-backend"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # An explicit backend in the settings the node cannot provide: apulld will not start.
        return "none", [proc.stderr.strip() or "apulld --check-backend failed"]
    lines = proc.stdout.strip().splitlines()
    if not lines or lines[0].strip() not in ("fscache", "file", "none"):
        return None
    return lines[0].strip(), [line[2:] for line in lines[1:] if line.startswith("- ")]


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
        "fuse": is_char_device("/dev/fuse"),
    }
    fs_ctl = None
    if os.path.isdir(FS_CTL):
        fs_ctl = dict((p, read(os.path.join(FS_CTL, p))) for p in FS_CTL_PARAMS)
    facts["fs_ctl"] = fs_ctl
    facts["erofs"] = module_state("erofs")
    facts["cachefiles"] = module_state("cachefiles")
    facts["modules"] = module_support(facts)

    asked = None
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
        # What apulld itself says: the running one, else the installed one's check (with
        # the modules loaded, as its service's pre-start check loads them).
        ping = apulld_ping(params["apulld_address"])
        if ping is not None:
            asked = ("apulld", ping.get("backend"), list(ping.get("reasons") or []))
        elif not facts["holder"] and os.path.exists(params["apulld_config"]):
            checked = apulld_check_backend(params["apulld_binary"])
            if checked is not None:
                asked = ("apulld --check-backend", *checked)
    finally:
        for name in reversed(loaded_for_probe):
            modprobe(name, remove=True)

    facts["backend"], facts["ondemand"] = backend(facts, params["block_size"])
    facts["ondemand_source"] = ondemand_verdict(facts)[1]
    facts["ondemand_note"] = ondemand_note(facts)
    facts["backend_reasons"] = backend_reasons(facts, params["block_size"])
    facts["backend_source"] = "kernel facts"
    # A running apulld's answer is the truth. An installed one's check sees a closed fs_ctl
    # gate as no fscache, but its service never starts with the gate closed, and the fscache
    # step opens it: then the kernel facts say what apulld will get.
    gated = facts["backend"] == "fscache" and facts["ondemand"] == "gated"
    known = asked is not None and asked[1] in ("fscache", "file", "none")
    if known and (asked[0] == "apulld" or not gated):
        facts["backend_source"], facts["backend"], facts["backend_reasons"] = asked
    facts["backend_why"] = backend_why(facts)
    facts["disk"] = [
        dict(zip(("path", "free_mb"), free_mb(d)), wanted=d) for d in params["data_dirs"]
    ]
    facts["registry"] = registry_check(params["registry"], params["registry_insecure"])
    facts["problems"] = problems(facts, params)
    return facts


def modules_source(modules):
    """'modules (rebuilt outside the kernel: FILES)', or 'modules (FILES)'."""
    files = [modules[n]["file"] for n, _ in ONDEMAND_SYMBOLS if modules.get(n, {}).get("file")]
    rebuilt = [modules[n]["file"] for n, _ in ONDEMAND_SYMBOLS if modules.get(n, {}).get("rebuilt")]
    if rebuilt:
        return "modules (rebuilt outside the kernel: %s)" % ", ".join(rebuilt)
    return "modules (%s)" % ", ".join(files) if files else "modules (built in)"


def ondemand_verdict(facts):
    """(on-demand state, the evidence that decided it): the first of these that tells wins -
    the fs_ctl gate, the bind probe's acceptance, the holder of /dev/cachefiles, the probe's
    rejection, the modules' own code, the kernel config."""
    fs_ctl = facts["fs_ctl"]
    kconfig = facts["kconfig"]
    holder = facts["holder"]
    if fs_ctl:
        # EulerOS / openEuler: the gate exists only on kernels carrying on-demand support.
        enabled = all(fs_ctl.get(p) == "Y" for p in FS_CTL_PARAMS)
        return ("enabled" if enabled else "gated"), "fs_ctl gate"
    if facts["probe"] == "accepted":
        return "supported", "bind probe"
    if holder and holder.get("comm") == "apulld":
        return "in use by apulld", "apulld"
    if holder:
        return "held by " + str(holder.get("comm")), "/dev/cachefiles holder"
    if facts["probe"].startswith("rejected"):
        return "unsupported", "bind probe"
    modules = facts.get("modules") or {}
    seen = [modules.get(name, {}).get("ondemand") for name, _ in ONDEMAND_SYMBOLS]
    if None not in seen:
        # The modules themselves: they may have been rebuilt apart from the kernel config.
        return ("supported (modules)" if all(seen) else "unsupported"), modules_source(modules)
    if all(kconfig.get(o) == "y" for o in ONDEMAND_OPTIONS):
        return "supported (kernel config)", "kernel config"
    if any(v is not None for v in kconfig.values()):
        return "unsupported", "kernel config"
    return "unsupported", "no evidence (no kernel config readable, %s)" % facts["probe"]


def ondemand_note(facts):
    """Why the kernel config's on-demand options contradict the verdict, or ''."""
    kconfig = facts["kconfig"]
    said = [(o, kconfig.get(o)) for o in ONDEMAND_OPTIONS]
    if any(value is None for _, value in said):
        return ""  # no kernel config readable: nothing to contradict
    config_says = ", ".join("%s=%s" % pair for pair in said)
    config_yes = all(value == "y" for _, value in said)
    ondemand = facts["ondemand"]
    source = facts["ondemand_source"]
    if ondemand in FSCACHE_STATES and not config_yes:
        modules = facts.get("modules") or {}
        rebuilt = [
            modules[name]["file"]
            for name, _ in ONDEMAND_SYMBOLS
            if modules.get(name, {}).get("rebuilt") and modules[name].get("ondemand") is not False
        ]
        if rebuilt:
            return (
                "the kernel config says %s, but on-demand support comes from modules rebuilt "
                "outside the kernel (%s): the config describes only the kernel's own modules; "
                "on-demand %s, decided by: %s" % (config_says, ", ".join(rebuilt), ondemand, source)
            )
        return (
            "the kernel config says %s, but on-demand is %s, decided by: %s (the config on disk "
            "does not describe the modules in use)" % (config_says, ondemand, source)
        )
    if ondemand == "unsupported" and config_yes and source != "kernel config":
        detail = " (%s)" % facts["probe"] if source == "bind probe" else ""
        return "the kernel config says %s, but on-demand is unsupported, decided by: %s%s" % (
            config_says,
            source,
            detail,
        )
    return ""


def backend(facts, block_size):
    """(backend, on-demand state) from what was detected."""
    page_ok = facts["page_size"] == block_size
    ondemand = ondemand_verdict(facts)[0]
    fscache_ok = ondemand in FSCACHE_STATES
    if fscache_ok and page_ok and facts["erofs"] != "missing" and facts["cachefiles"] != "missing":
        return "fscache", ondemand
    if file_backed(facts)[0]:
        return "file", ondemand
    return "none", ondemand


def release_at_least(release, major, minor):
    parts = release.split("-", 1)[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def file_backed(facts):
    """(ok, reason): apulld's file backend test - /dev/fuse, erofs, a kernel that mounts
    EROFS from a file (CONFIG_EROFS_FS_BACKED_BY_FILE=y; >= 6.12 when no config is readable)."""
    if not facts["fuse"]:
        return False, "file: /dev/fuse missing (modprobe fuse)"
    if facts["erofs"] == "missing" and not facts.get("erofs_registered"):
        return False, "file: erofs is neither in /proc/filesystems nor an installed module"
    option = "CONFIG_EROFS_FS_BACKED_BY_FILE"
    value = facts["kconfig"].get(option)
    if value == "y":
        return True, "file: /dev/fuse present, erofs available, %s=y" % option
    if value is None and release_at_least(facts["kernel"], 6, 12):
        return True, "file: /dev/fuse present, erofs available, no kernel config (>= 6.12)"
    found = "no kernel config readable" if value is None else "%s is not set" % option
    return False, "file: kernel %s cannot mount EROFS from a file (%s)" % (facts["kernel"], found)


def backend_reasons(facts, block_size):
    """One reason per backend tried, worded like apulld's (fscache, then file, then none)."""
    ondemand = facts["ondemand"]
    if facts["backend"] == "fscache":
        detail = {
            "enabled": "fs_ctl gate open",
            "gated": "fs_ctl gate closed (playbooks/fscache.yml opens it)",
            "supported": "bind ondemand accepted by the probe",
            "in use by apulld": "/dev/cachefiles held by apulld",
            "supported (modules)": "the cachefiles and erofs modules have the on-demand code",
        }.get(ondemand, "kernel config has CONFIG_CACHEFILES_ONDEMAND and CONFIG_EROFS_FS_ONDEMAND")
        return ["fscache: on-demand %s: %s" % (ondemand, detail)]
    if facts["page_size"] != block_size and ondemand != "unsupported":
        why = "page size %s != EROFS block size %s" % (facts["page_size"], block_size)
    else:
        why = "on-demand %s (%s)" % (ondemand, facts["probe"])
    reasons = ["fscache: " + why]
    ok, reason = file_backed(facts)
    reasons.append(reason)
    if not ok:
        reasons.append("none: no cache backend available; image data cannot be served")
    return reasons


def backend_why(facts):
    """The reason for the status table, whole (the table shortens it at a word boundary; the
    JSON report keeps it as it is)."""
    name = facts["backend"]
    if facts["backend_source"] != "kernel facts":
        # apulld's reason for the backend it chose: its first for fscache, else its last.
        reasons = facts["backend_reasons"] or ["?"]
        text = reasons[0] if name == "fscache" else reasons[-1]
        for prefix in ("fscache: ", "file: ", "none: "):
            if text.startswith(prefix):
                text = text[len(prefix) :]
        text = text.split(" to /", 1)[0]
        return "%s: %s" % (facts["backend_source"].split()[0], text)
    if name == "fscache":
        return "on-demand " + facts["ondemand"]
    if name == "file":
        return "EROFS file-backed + /dev/fuse"
    return "no on-demand (%s), no EROFS file-backed" % facts["probe"]


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
            apulld_address=dict(type="path", default="/run/apulld.sock"),
            apulld_binary=dict(type="path", default="/usr/bin/apulld"),
            apulld_config=dict(type="path", default="/etc/apull/config.toml"),
        ),
        supports_check_mode=True,
    )
    module.exit_json(changed=False, ansible_facts={"apull_node": detect(module.params)})


if __name__ == "__main__":
    main()
