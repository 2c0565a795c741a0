#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Documentation only: apull.deploy.containerd_config is an action plugin (plugins/action/)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: containerd_config
short_description: Patch containerd's config.toml for the apull proxy snapshotter
description:
  - Runs on the controller (an action plugin); the node needs only a POSIX shell, coreutils
    and containerd. Two shell round trips (read; check and write), no Python start on the
    node.
  - Reads O(path) on the node. When it does not exist, starts from the node's
    C(containerd config default).
  - Adds or updates C([proxy_plugins.<snapshotter_name>]) with C(type = "snapshot") and
    C(address = <proxy_address>), keeping other proxy plugins; sets
    C(disable_snapshot_annotations = false) and C(discard_unpacked_layers = false) in the CRI
    image settings (C([plugins."io.containerd.grpc.v1.cri".containerd]) in a version 2
    config, C([plugins."io.containerd.cri.v1.images"]) in a version 3 config); sets the CRI
    default C(snapshotter) only with O(set_default_snapshotter); adds a CRI registry mirror
    C(endpoint = ["http://HOST:PORT"]) for each of O(insecure_registries); then applies
    O(overrides).
  - Comments, ordering and every other key are kept byte for byte (tomlkit); a key already
    holding the wanted value is not touched, so a second run changes nothing.
  - Refuses a version 1 config (no C(version) line) and tells how to migrate it; refuses,
    naming the key, a file whose layout cannot be edited safely.
  - Before writing, the new text is checked with C(containerd --config TMP config dump) on
    the node (TMP beside O(path)); if containerd refuses it, nothing is written.
  - The first time it writes, copies the original to O(backup_path) (owner, mode and times
    kept) and never overwrites that copy again; for a file it created, writes the marker
    C(<backup_path>.absent) instead, so that uninstalling deletes the file.
  - Before each write it copies the current text to C(<path>.apull-prev) (RV(previous_path)),
    which a caller restores in place when containerd does not come back on the new config,
    and removes once containerd runs on it. A copy still there at the next run means that
    write was never confirmed (the run stopped before the restart); RV(restart_pending) says
    so, and the copy is kept as the text to roll back to.
  - Writes in place (same inode, owner and mode), so a bind-mounted file keeps working.
  - Check mode reads only and reports the diff; with C(--diff) the diff is shown.
  - With O(state=original) it undoes all that instead, for uninstall. The backup's bytes go
    back into the file in place (or, if apull created the file, the file is removed), then
    the backup or marker and any rollback copy are removed. Does nothing when there is no
    backup and no marker.
options:
  state:
    description:
      - V(patched) patches the file; V(original) puts the original back.
      - V(released) writes the original patched again but with the original's own CRI
        default snapshotter (C(overlayfs) when apull created the file), so that nothing new
        starts on apull while what is on it is removed; the step before V(original) in an
        uninstall. Does nothing on a node never patched.
    type: str
    choices: [patched, released, original]
    default: patched
  path:
    description: containerd's config file on the node.
    type: str
    default: /etc/containerd/config.toml
  backup_path:
    description: Where the original file is kept (written once). Default C(<path>.apull-orig).
    type: str
  proxy_address:
    description: Socket of the apull snapshotter (C(address) of the proxy plugin).
    type: str
    default: /run/containerd-apull-grpc.sock
  set_default_snapshotter:
    description:
      - Make the proxy snapshotter the CRI default C(snapshotter). When false the current
        default is left as it is.
    type: bool
    default: false
  snapshotter_name:
    description: Name of the proxy plugin, and of the snapshotter when it becomes the default.
    type: str
    default: apull
  insecure_registries:
    description:
      - Registries (V(HOST:PORT)) that CRI pulls reach over plain HTTP. Each gets
        C([plugins."io.containerd.grpc.v1.cri".registry.mirrors."HOST:PORT"]) with
        C(endpoint = ["http://HOST:PORT"]) first (under C(plugins."io.containerd.cri.v1.images")
        in a version 3 config); endpoints already listed for that host stay after it.
      - Refused when the file sets C(registry.config_path) (containerd then reads
        C(hosts.toml) files and refuses C(mirrors)); the message names the key.
    type: list
    elements: str
    default: []
  overrides:
    description:
      - Extra keys to set after the patch, as TOML dotted key path -> value (scalars or
        arrays), for example the key C(plugins."io.containerd.grpc.v1.cri".sandbox_image)
        with the value C(registry.example.com/pause:3.9).
    type: dict
    default: {}
notes:
  - Supports check mode and diff mode.
  - File contents are shown only through the diff.
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Patch containerd's config for the apull snapshotter
  apull.deploy.containerd_config:
    proxy_address: /run/containerd-apull-grpc.sock
  register: containerd_config_result

- name: Also make apull the CRI default snapshotter, and pull from a plain-HTTP registry
  apull.deploy.containerd_config:
    set_default_snapshotter: true
    insecure_registries: [registry.lab:5000]

- name: Put containerd's original config.toml back (uninstall)
  apull.deploy.containerd_config:
    state: original
  register: containerd_original
"""

RETURN = r"""
path:
  description: The config file.
  returned: always
  type: str
version:
  description: The config's version (2 or 3).
  returned: when the file was read and parsed
  type: int
changes:
  description: Each key set, with its old value (null when it was absent) and new value.
  returned: when the file was read and parsed
  type: list
  elements: dict
  sample: [{"key": "proxy_plugins.apull.type", "old": null, "new": "snapshot"}]
config_changed:
  description: >-
    With O(state=original): the file's content changed (or it was removed), so containerd
    must be restarted. False when only the backup or marker was removed.
  returned: when O(state=original) finds a backup or marker
  type: bool
created:
  description: This run created the file (it did not exist).
  returned: always
  type: bool
backup_path:
  description: Where the original is kept.
  returned: always
  type: str
backup_created:
  description: This run wrote the backup (the first patch of an existing file).
  returned: when written
  type: bool
marker_created:
  description: This run wrote C(<backup_path>.absent) (the first patch created the file).
  returned: when written
  type: bool
backup_exists:
  description: A backup existed before this run.
  returned: when the file was read
  type: bool
original_absent:
  description: There was no file before apull first patched it (uninstall deletes it).
  returned: when the file was read
  type: bool
previous_path:
  description: >-
    Copy of the text before the write (this run's, or an unconfirmed earlier one's), to
    restore in place if containerd does not come back, and to remove once it does; null when
    there is none (no change, check mode, or the file was created).
  returned: always
  type: str
restart_pending:
  description: >-
    A rollback copy from an earlier write is still there: that write was never followed by
    a successful containerd restart, so containerd must be restarted even if nothing changed
    now.
  returned: always
  type: bool
grpc_address:
  description: >-
    The socket containerd serves its API on under the patched config (C([grpc] address)),
    for C(ctr --address) after a restart; with O(state=original), under the original config.
  returned: when the file was read and parsed, or an original found
  type: str
grpc_address_before:
  description: The same under the config as it was before this run.
  returned: when the file was read and parsed
  type: str
sha256:
  description: >-
    The sha256 of the file's text once the task is done (this run's patch, or the text
    already patched); C(apull status) compares the node's file with it.
  returned: when the file was read and parsed
  type: str
containerd_version:
  description: The node's containerd version, e.g. C(1.6.20).
  returned: when read
  type: str
stat:
  description: Owner, group, mode and inode of the file as read (kept by the write).
  returned: when the file existed
  type: dict
key:
  description: The TOML key a failure is about, when there is one.
  returned: on failure
  type: str
diff:
  description: Before and after text, in diff mode.
  returned: when changed and in diff mode
  type: dict
"""
