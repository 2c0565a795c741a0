#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Boot a new kernel once through GRUB, and make it the default only once it is verified."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: boot_loader
short_description: Boot a kernel once through GRUB, then commit it as the default
description:
  - Works with GRUB 2 as Debian (C(grub-reboot), C(update-grub)) and the RPM family
    (C(grub2-reboot), C(grub2-mkconfig)) install it, with classic menu entries or BLS
    entries (C(/boot/loader/entries)).
  - C(state=pinned) makes the running kernel's own menu entry the saved default
    (C(GRUB_DEFAULT=saved), then C(grub-set-default)), so that installing a newer kernel
    does not change what a power cycle boots. Fails, changing nothing, on a node without
    GRUB.
  - C(state=once) boots the kernel of C(release) at the next boot only (C(grub-reboot)).
    Without C(release), the kernel installed since C(installed_before) is taken; when no
    new release was installed (new modules for the running kernel), nothing is set.
  - C(state=default) makes the kernel of C(release) the saved default (after it was verified).
  - C(state=info) only reads.
  - Check mode and C(--diff) report the changes and make none.
options:
  state:
    description: What to do.
    type: str
    choices: [info, pinned, once, default]
    default: info
  release:
    description: The kernel release (C(uname -r)) to boot once or make the default.
    type: str
    default: ""
  installed_before:
    description: Kernel releases installed before the upgrade (C(kernels) of an earlier call).
    type: list
    elements: str
    default: []
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Pin the running kernel
  apull.deploy.boot_loader:
    state: pinned
  register: before

- name: Boot the newly installed kernel once
  apull.deploy.boot_loader:
    state: once
    installed_before: "{{ before.kernels }}"
"""

RETURN = r"""
loader:
  description: C(grub) (Debian tools), C(grub2) (RPM family tools) or C(none).
  returned: always
  type: str
running:
  description: The running kernel release.
  returned: always
  type: str
kernels:
  description: Kernel releases with an image in /boot, sorted.
  returned: always
  type: list
  elements: str
default_entry:
  description: The saved default entry (C(saved_entry) in grubenv) after this call.
  returned: always
  type: str
next_entry:
  description: The entry booted once at the next boot (C(next_entry) in grubenv), if any.
  returned: always
  type: str
release:
  description: The release booted once or made the default (empty if none).
  returned: always
  type: str
entry:
  description: The menu entry of C(release), as grub-reboot and grub-set-default take it.
  returned: always
  type: str
"""

import os
import platform
import re

from ansible.module_utils.basic import AnsibleModule

#: How each GRUB flavour is driven: its tools, its configuration and environment block.
FLAVOURS = {
    "grub": {
        "reboot": "grub-reboot",
        "set_default": "grub-set-default",
        "mkconfig": ["update-grub"],
        "cfg": "/boot/grub/grub.cfg",
        "env": "/boot/grub/grubenv",
    },
    "grub2": {
        "reboot": "grub2-reboot",
        "set_default": "grub2-set-default",
        "mkconfig": ["grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"],
        "cfg": "/boot/grub2/grub.cfg",
        "env": "/boot/grub2/grubenv",
    },
}
DEFAULTS_FILE = "/etc/default/grub"
#: Debian's grub-mkconfig also reads /etc/default/grub.d/*.cfg, after the main file.
DEFAULTS_DIR = "/etc/default/grub.d"
DROP_IN = DEFAULTS_DIR + "/90-apull-boot-once.cfg"
DROP_IN_TEXT = (
    "# apull-deploy: boot the saved entry, so that a new kernel is booted once (grub-reboot)\n"
    "# and becomes the default only after it was verified (grub-set-default).\n"
    "GRUB_DEFAULT=saved\n"
)
BLS_DIR = "/boot/loader/entries"

_ENTRY = re.compile(r"^\s*(menuentry|submenu)\s+(['\"])(.*?)\2(.*)$")
_ID = re.compile(r"(?:\$menuentry_id_option|--id)\s+['\"]?([^'\"\s]+)")
_LINUX = re.compile(r"^\s*linux(?:16|efi)?\s+(\S+)")


def release_of(image):
    """The release of a kernel image path (/boot/vmlinuz-R or /vmlinuz-R), or None."""
    name = image.rsplit("/", 1)[-1]
    for prefix in ("vmlinuz-", "vmlinux-", "Image-"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def menu_entries(text):
    """The boot entries of a grub.cfg: dicts of path (as grub-reboot takes it), title,
    release and recovery."""
    entries = []
    stack = []  # (kind, id) of the open blocks
    current = None
    for line in text.splitlines():
        match = _ENTRY.match(line)
        if match:
            kind, title, rest = match.group(1), match.group(3), match.group(4)
            id_match = _ID.search(rest)
            ident = id_match.group(1) if id_match else title
            parents = [i for k, i in stack if k == "submenu"]
            if kind == "menuentry":
                current = {
                    "path": ">".join([*parents, ident]),
                    "title": title,
                    "release": None,
                    "recovery": "recovery mode" in title,
                }
                entries.append(current)
            stack.append((kind, ident))
            continue
        linux = _LINUX.match(line)
        if linux and current is not None and current["release"] is None:
            current["release"] = release_of(linux.group(1))
            if " single" in line.split(linux.group(1), 1)[1] + " ":
                current["recovery"] = True
            continue
        if line.strip() == "}" and stack:
            kind, _ = stack.pop()
            if kind == "menuentry":
                current = None
    return entries


def bls_entries(directory):
    """Entries of a BLS directory (/boot/loader/entries): the id is the file's stem."""
    entries = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return entries
    for name in names:
        if not name.endswith(".conf"):
            continue
        entry = {"path": name[: -len(".conf")], "title": "", "release": None, "recovery": False}
        with open(os.path.join(directory, name)) as handle:
            for line in handle:
                key, _, value = line.strip().partition(" ")
                if key == "title":
                    entry["title"] = value.strip()
                    entry["recovery"] = "rescue" in value or "recovery" in value
                elif key == "linux":
                    entry["release"] = release_of(value.strip())
        entries.append(entry)
    return entries


def entry_for(entries, release):
    """The entry that boots `release` normally: its own entry (its id names the release, as
    Debian's "Advanced options" entries do) rather than the generic newest-kernel one."""
    matches = [e for e in entries if e["release"] == release and not e["recovery"]]
    own = [e for e in matches if release in e["path"]]
    chosen = (own or matches or [None])[0]
    return chosen["path"] if chosen else None


def read_env(path):
    """The variables of a GRUB environment block."""
    env = {}
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("#") or "=" not in line:
                    continue
                key, _, value = line.rstrip("\n").partition("=")
                env[key] = value
    except (IOError, OSError):
        pass
    return env


def installed_kernels(boot="/boot"):
    releases = set()
    try:
        names = os.listdir(boot)
    except OSError:
        return []
    for name in names:
        release = release_of(name)
        if release and not name.endswith((".old", ".bak")):
            releases.add(release)
    return sorted(releases)


def new_default_setting(defaults_text, has_dir, drop_in_text):
    """(path, wanted text, current text) of the file that makes GRUB boot the saved entry,
    or None when it already does."""
    if has_dir:
        if drop_in_text == DROP_IN_TEXT:
            return None
        return DROP_IN, DROP_IN_TEXT, drop_in_text
    lines = defaults_text.splitlines(True)
    wanted = []
    seen = False
    for line in lines:
        if re.match(r"^\s*GRUB_DEFAULT=", line):
            seen = True
            line = "GRUB_DEFAULT=saved\n"
        wanted.append(line)
    if not seen:
        if wanted and not wanted[-1].endswith("\n"):
            wanted[-1] += "\n"
        wanted.append("GRUB_DEFAULT=saved\n")
    text = "".join(wanted)
    return None if text == defaults_text else (DEFAULTS_FILE, text, defaults_text)


def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except (IOError, OSError):
        return ""


class BootLoader:
    """The node's GRUB: which tools, which entries, which environment."""

    def __init__(self, module):
        self.module = module
        self.flavour = None
        for name, flavour in FLAVOURS.items():
            if module.get_bin_path(flavour["reboot"]) and os.path.exists(flavour["cfg"]):
                self.flavour = name
                break

    @property
    def tools(self):
        return FLAVOURS[self.flavour]

    def entries(self):
        entries = menu_entries(_read(self.tools["cfg"]))
        if os.path.isdir(BLS_DIR):
            entries += bls_entries(BLS_DIR)
        return entries

    def env(self):
        return read_env(self.tools["env"])

    def run(self, argv, step):
        rc, out, err = self.module.run_command(argv)
        if rc != 0:
            self.module.fail_json(
                msg="%s: %s failed (rc %d): %s" % (step, " ".join(argv), rc, (err or out).strip())
            )

    def set(self, env, key, entry, step, result, diffs):
        """Make GRUB's `key` entry (saved_entry: grub-set-default, next_entry: grub-reboot)
        `entry` unless it is already, recording the change and its diff in result/diffs."""
        default = key == "saved_entry"
        if env.get(key) != entry:
            result["changed"] = True
            diffs.append(env_diff(self, key, env, entry))
            if not self.module.check_mode:
                self.run([self.tools["set_default" if default else "reboot"], entry], step)
        result["default_entry" if default else "next_entry"] = entry

    def entry(self, release, step):
        path = entry_for(self.entries(), release)
        if path is None:
            self.module.fail_json(
                msg="%s: %s has no boot entry for kernel %s (looked for a 'linux' line loading "
                "vmlinuz-%s); installed kernels: %s"
                % (step, self.tools["cfg"], release, release, ", ".join(installed_kernels()))
            )
        return path


def env_diff(loader, key, env, value):
    """A --diff entry for one variable of GRUB's environment block."""
    path = "%s (%s)" % (loader.tools["env"], key)
    return {
        "before_header": path,
        "after_header": path,
        "before": "%s=%s\n" % (key, env.get(key, "")) if key in env else "",
        "after": "%s=%s\n" % (key, value),
    }


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="info", choices=["info", "pinned", "once", "default"]),
            release=dict(type="str", default=""),
            installed_before=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    state = module.params["state"]
    running = platform.release()
    loader = BootLoader(module)
    result = {
        "changed": False,
        "loader": loader.flavour or "none",
        "running": running,
        "kernels": installed_kernels(),
        "release": "",
        "entry": "",
        "default_entry": "",
        "next_entry": "",
    }
    if loader.flavour is None:
        if state == "info":
            module.exit_json(**result)
        module.fail_json(
            msg="this node has no GRUB that can boot a kernel once (looked for grub-reboot with "
            "/boot/grub/grub.cfg and grub2-reboot with /boot/grub2/grub.cfg); nothing was "
            "changed. Set kernel_boot_once: false to reboot into whatever the node's boot "
            "loader picks, with no fallback.",
            **result,
        )
    env = loader.env()
    result["default_entry"] = env.get("saved_entry", "")
    result["next_entry"] = env.get("next_entry", "")
    diffs = []

    if state == "pinned":
        has_dir = os.path.isdir(DEFAULTS_DIR) and loader.flavour == "grub"
        setting = new_default_setting(_read(DEFAULTS_FILE), has_dir, _read(DROP_IN))
        if setting is not None:
            path, text, old = setting
            result["changed"] = True
            diffs.append(
                {"before_header": path, "after_header": path, "before": old, "after": text}
            )
            if not module.check_mode:
                with open(path, "w") as handle:
                    handle.write(text)
                loader.run(loader.tools["mkconfig"], "regenerating the GRUB configuration")
        if module.check_mode:
            # The configuration was not regenerated: its entries may change.
            wanted = entry_for(loader.entries(), running) if setting is None else None
            wanted = wanted or "<the entry of %s after %s>" % (
                running,
                " ".join(loader.tools["mkconfig"]),
            )
        else:
            wanted = loader.entry(running, "pinning the running kernel")
        result["release"], result["entry"] = running, wanted
        loader.set(env, "saved_entry", wanted, "pinning the running kernel", result, diffs)
    elif state == "once":
        release = module.params["release"]
        if not release:
            new = sorted(set(result["kernels"]) - set(module.params["installed_before"]))
            if len(new) > 1:
                module.fail_json(
                    msg="several kernels were installed (%s); set kernel_expected_release to the "
                    "one to boot" % ", ".join(new),
                    **result,
                )
            release = new[0] if new else ""
        if release and release != running:
            entry = loader.entry(release, "booting the new kernel once")
            result["release"], result["entry"] = release, entry
            loader.set(env, "next_entry", entry, "booting the new kernel once", result, diffs)
    elif state == "default":
        release = module.params["release"] or running
        entry = loader.entry(release, "making the verified kernel the default")
        result["release"], result["entry"] = release, entry
        loader.set(
            env, "saved_entry", entry, "making the verified kernel the default", result, diffs
        )
    if diffs and module._diff:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
