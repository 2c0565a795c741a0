#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""A role's directories and small files on a node in one round trip: each compared with what
the node has, and only what differs written."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node_files
short_description: Directories and small files, compared and written in one call
description:
  - Makes each directory in I(directories) exist with its mode, owned by root; then writes
    each file in I(files) whose content differs from the node's, and sets the mode and
    root ownership of those whose metadata differs.
  - A file is written to a temporary file in its own directory, synced, and renamed over
    the old one, so a reader sees the old content or the new, never half of it.
  - One call does what a C(ansible.builtin.file) loop and several C(ansible.builtin.template)
    tasks did, each of which costs a round trip and a Python start on the node.
  - In check mode nothing is written; the result says what would change. With C(--diff) it
    gives each changed file's old and new text, so it is not for secrets (their content is
    a module argument too), so write those with C(no_log).
options:
  directories:
    description: Directories to create or fix, in order (parents first).
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: Absolute path.
        type: path
        required: true
      mode:
        description: Octal mode, as a string (C("0750")).
        type: str
        required: true
  files:
    description: Files to write, with their whole content (render templates with the
      C(ansible.builtin.template) lookup).
    type: list
    elements: dict
    default: []
    suboptions:
      dest:
        description: Absolute path; its directory must exist.
        type: path
        required: true
      content:
        description: The file's text.
        type: str
        required: true
      mode:
        description: Octal mode, as a string (C("0640")).
        type: str
        required: true
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Install the settings and the unit
  apull.deploy.node_files:
    directories:
      - {path: /etc/apull, mode: "0750"}
    files:
      - dest: /etc/apull/config.toml
        content: "{{ lookup('ansible.builtin.template', 'config.toml.j2') }}"
        mode: "0640"
  register: installed
"""

RETURN = r"""
changed_paths:
  description: The directories and files this call created or changed (or would, in check
    mode), in the order given.
  returned: always
  type: list
  elements: str
written:
  description: The files whose content was written (or would be).
  returned: always
  type: list
  elements: str
"""

import contextlib
import os
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule

ROOT_UID = 0
ROOT_GID = 0


def wanted_mode(text, what):
    try:
        mode = int(text, 8)
    except (TypeError, ValueError):
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise ValueError('%s: mode %r is not an octal mode such as "0640"' % (what, text))
    return mode


def current(path):
    """(mode, uid, gid, is_dir) of path, or None when it does not exist."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, stat.S_ISDIR(st.st_mode)


def read_text(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (IOError, OSError):
        return None


def write_atomically(path, data, mode):
    directory = os.path.dirname(path) or "/"
    fd, temp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chown(temp, ROOT_UID, ROOT_GID)
        os.chmod(temp, mode)
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def ensure_directory(spec, check_mode, diffs):
    path = spec["path"]
    mode = wanted_mode(spec["mode"], path)
    now = current(path)
    if now is not None and not now[3]:
        raise ValueError("%s exists and is not a directory" % path)
    if now == (mode, ROOT_UID, ROOT_GID, True):
        return False
    before = "absent" if now is None else "directory %04o %d:%d" % (now[0], now[1], now[2])
    diffs.append(
        {
            "before_header": path,
            "after_header": path,
            "before": before + "\n",
            "after": "directory %04o 0:0\n" % mode,
        }
    )
    if not check_mode:
        if now is None:
            os.mkdir(path, mode)
        os.chown(path, ROOT_UID, ROOT_GID)
        os.chmod(path, mode)
    return True


def ensure_file(spec, check_mode, diffs):
    """'written', 'metadata' or None (nothing to do)."""
    path = spec["dest"]
    mode = wanted_mode(spec["mode"], path)
    data = spec["content"].encode("utf-8")
    now = current(path)
    if now is not None and now[3]:
        raise ValueError("%s is a directory" % path)
    old = read_text(path) if now is not None else None
    if old == data and now[:3] == (mode, ROOT_UID, ROOT_GID):
        return None
    if old == data:
        diffs.append(
            {
                "before_header": path,
                "after_header": path,
                "before": "mode %04o %d:%d\n" % now[:3],
                "after": "mode %04o 0:0\n" % mode,
            }
        )
        if not check_mode:
            os.chown(path, ROOT_UID, ROOT_GID)
            os.chmod(path, mode)
        return "metadata"
    before = "" if old is None else old.decode("utf-8", "replace")
    diffs.append(
        {"before_header": path, "after_header": path, "before": before, "after": spec["content"]}
    )
    if not check_mode:
        if not os.path.isdir(os.path.dirname(path) or "/"):
            raise ValueError("%s: its directory does not exist" % path)
        write_atomically(path, data, mode)
    return "written"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            directories=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(
                    path=dict(type="path", required=True),
                    mode=dict(type="str", required=True),
                ),
            ),
            files=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(
                    dest=dict(type="path", required=True),
                    content=dict(type="str", required=True),
                    mode=dict(type="str", required=True),
                ),
            ),
        ),
        supports_check_mode=True,
    )
    diffs = []
    changed_paths = []
    written = []
    try:
        for spec in module.params["directories"]:
            if ensure_directory(spec, module.check_mode, diffs):
                changed_paths.append(spec["path"])
        for spec in module.params["files"]:
            what = ensure_file(spec, module.check_mode, diffs)
            if what:
                changed_paths.append(spec["dest"])
            if what == "written":
                written.append(spec["dest"])
    except (ValueError, IOError, OSError) as exc:
        module.fail_json(
            msg="%s (changed before the failure: %s)" % (exc, ", ".join(changed_paths) or "none"),
            changed=bool(changed_paths) and not module.check_mode,
            changed_paths=changed_paths,
        )
    module.exit_json(
        changed=bool(changed_paths),
        changed_paths=changed_paths,
        written=written,
        diff=diffs,
    )


if __name__ == "__main__":
    main()
