# Copyright: apull-deploy contributors
# Apache License 2.0
"""Patch containerd's config.toml on a node for the apull proxy snapshotter.

Runs on the controller: the node's file is read, patched with apull.containerd.config_patch
(tomlkit, which the nodes do not have), checked by the node's own containerd and written back
in place. Documentation: plugins/modules/containerd_config.py.

Two shell round trips (read; check and write), no Python start on the node.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
import sys
from pathlib import Path

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase

DEFAULT_PATH = "/etc/containerd/config.toml"
# A file travels inside the write command (base64); Linux caps one argument at 128 KiB.
MAX_ENCODED = 96 * 1024

ARGUMENT_SPEC = dict(
    state=dict(type="str", default="patched", choices=["patched", "released", "original"]),
    path=dict(type="str", default=DEFAULT_PATH),
    backup_path=dict(type="str"),
    proxy_address=dict(type="str", default="/run/containerd-apull-grpc.sock"),
    set_default_snapshotter=dict(type="bool", default=False),
    snapshotter_name=dict(type="str", default="apull"),
    insecure_registries=dict(type="list", elements="str", default=[]),
    registry_mirrors=dict(type="list", elements="str", default=[]),
    registry_hosts_dir=dict(type="str", default="/etc/containerd/certs.d"),
    registry_dial_timeout=dict(type="str", default="5s"),
    overrides=dict(type="dict", default={}),
)

# Prints what the plugin needs to know, one `@@name value` line each, then base64 sections
# (`@@section NAME`): the file (or, when there is none, containerd's default config) and, when
# asked, the backup. Reads only.
READ_SCRIPT = r"""
v=
if command -v containerd >/dev/null 2>&1; then v=$(containerd --version 2>/dev/null); fi
echo "@@version $v"
if [ -e "$b" ]; then echo "@@backup 1"; else echo "@@backup 0"; fi
if [ -e "$m" ]; then echo "@@marker 1"; else echo "@@marker 0"; fi
if [ -e "$prev" ]; then echo "@@previous 1"; else echo "@@previous 0"; fi
if [ -f "$p" ]; then
  echo "@@exists 1"
  echo "@@stat $(stat -L -c '%u %g %a %i' -- "$p")"
  echo "@@section current"
  base64 < "$p" || exit 3
elif [ -e "$p" ]; then
  echo "@@exists not-a-file"
  exit 0
else
  echo "@@exists 0"
  if [ "$want_default" = 1 ] && [ -n "$v" ]; then
    if out=$(containerd config default 2>/dev/null); then
      echo "@@section current"
      printf '%s\n' "$out" | base64
    else
      echo "@@default-failed"
    fi
  fi
fi
if [ "$want_backup" = 1 ] && [ -f "$b" ]; then
  echo "@@section backup"
  base64 < "$b" || exit 3
fi
# The registries' hosts.toml files: those under the hosts dir, and those apull listed as its own.
if [ -f "$hl" ]; then echo "@@section hostslist"; base64 < "$hl" || exit 3; fi
{ if [ -f "$hl" ]; then cat -- "$hl"; fi; for f in "$hd"/*/hosts.toml; do echo "$f"; done; } |
  sort -u | while read -r f; do
    if [ -f "$f" ]; then echo "@@section host:$f"; base64 < "$f" || exit 3; fi
  done || exit 3
# A file without settings (empty, or blank and comment lines only) is containerd's defaults:
# the patch starts from those (for a release: when the original was such a file).
keyless() { ! grep -q '^[[:space:]]*[^#[:space:]]' -- "$1"; }
if [ "$want_default" = 1 ] && [ -n "$v" ] && [ -f "$p" ]; then
  if keyless "$p" || { [ "$want_backup" = 1 ] && [ -f "$b" ] && keyless "$b"; }; then
    if out=$(containerd config default 2>/dev/null); then
      echo "@@section default"
      printf '%s\n' "$out" | base64
    else
      echo "@@default-failed"
    fi
  fi
fi
"""

# Writes the new text: into a temporary file beside the config, checked with
# `containerd config dump`; the original is copied to the backup once (or, for a file this
# creates, a marker says there was none); the current text to the rollback copy; then the
# new text goes into the file in place (same inode, owner and mode). Exit codes: 2 = refused
# by containerd (its words on `@@refused` lines), 1 = anything else (an `@@error` line).
# Messages go to stdout: over ssh with a tty, stderr arrives there anyway.
WRITE_SCRIPT = r"""
fail() { echo "@@error $*"; exit 1; }
d=$(dirname -- "$p")
if [ "$created" = 1 ]; then
  [ -e "$p" ] && fail "$p appeared while it was being patched; run again"
  mkdir -p -- "$d" || fail "cannot create $d"
else
  [ -f "$p" ] || fail "$p disappeared while it was being patched; run again"
  now=$(sha256sum < "$p") || fail "cannot read $p"
  [ "${now%% *}" = "$sum" ] || fail "$p changed while it was being patched; run again"
fi
t=
undo=
# On a failure after the hosts.toml files began to change, they are put back from the copy.
finish() {
  rc=$?
  if [ -n "$t" ]; then rm -f -- "$t"; fi
  if [ "$rc" != 0 ] && [ -n "$undo" ] && [ -d "$snap" ]; then
    if [ -d "$snap/dir" ]; then rm -rf -- "$hroot" && mv -- "$snap/dir" "$hroot"
    elif [ -e "$snap/absent" ]; then rm -rf -- "$hroot"; fi
    if [ -f "$snap/list" ]; then mv -f -- "$snap/list" "$hl"; else rm -f -- "$hl"; fi
    rm -rf -- "$snap"
  fi
}
trap finish EXIT
if [ "$cfg" = 1 ]; then
t=$(mktemp -- "$d/.apull-config.XXXXXX") || fail "cannot create a temporary file in $d"
printf '%s' "$new" | base64 -d > "$t" || fail "cannot write $t"
if ! err=$(containerd --config "$t" config dump 2>&1 >/dev/null); then
  printf '%s\n' "$err" | sed 's/^/@@refused /'
  exit 2
fi
fi
# The registries' hosts.toml files (each whole, by rename), the ones no longer wanted, the list
# (with `@created DIR` when apull made the hosts directory: uninstall removes it if empty).
made=
if [ -n "$hosts" ] && [ ! -d "$hroot" ]; then made="@created $hroot"; fi
# What they were, for a rollback if containerd does not come back (removed once it does).
if [ -n "$snap" ]; then
  rm -rf -- "$snap" && mkdir -p -- "$snap" || fail "cannot create $snap"
  if [ -d "$hroot" ]; then cp -a -- "$hroot" "$snap/dir" || fail "cannot copy $hroot"
  else : > "$snap/absent" || fail "cannot write $snap/absent"; fi
  if [ -f "$hl" ]; then cp -p -- "$hl" "$snap/list" || fail "cannot copy $hl"; fi
  undo=1
fi
if [ -n "$hosts" ]; then
  printf '%s\n' "$hosts" | while read -r f data; do
    [ -n "$f" ] || continue
    hdir=$(dirname -- "$f")
    mkdir -p -- "$hdir" || { echo "@@error cannot create $hdir"; exit 1; }
    n="$f.apull-new"
    { printf '%s' "$data" | base64 -d > "$n" && chmod 0644 -- "$n" && mv -f -- "$n" "$f"; } ||
      { rm -f -- "$n"; echo "@@error cannot write $f"; exit 1; }
  done || exit 1
fi
if [ -n "$stale" ]; then
  printf '%s\n' "$stale" | while read -r f; do
    [ -n "$f" ] || continue
    rm -f -- "$f" || { echo "@@error cannot remove $f"; exit 1; }
    rmdir -- "$(dirname -- "$f")" 2>/dev/null || true
  done || exit 1
fi
if [ -n "$rmroot" ]; then rmdir -- "$rmroot" 2>/dev/null || true; fi
if [ -n "$list" ]; then
  { printf '%s\n' "$list"; if [ -n "$made" ]; then printf '%s\n' "$made"; fi; } > "$hl.tmp$$" &&
    mv -f -- "$hl.tmp$$" "$hl" || fail "cannot write $hl"
elif [ -e "$hl" ]; then
  rm -f -- "$hl" || fail "cannot remove $hl"
fi
[ "$cfg" = 1 ] || { undo=; echo "@@written"; exit 0; }
if [ "$created" = 1 ]; then
  if [ ! -e "$b" ] && [ ! -e "$m" ]; then
    printf '%s\n' "$p did not exist before apull created it; uninstall removes it." > "$m" \
      || fail "cannot write $m"
    echo "@@marker-created"
  fi
  (umask 022 && cat -- "$t" > "$p") || { rm -f -- "$p"; fail "cannot write $p"; }
else
  if [ ! -e "$b" ] && [ ! -e "$m" ]; then
    { cp -p -- "$p" "$b.tmp$$" && mv -f -- "$b.tmp$$" "$b"; } || fail "cannot back up $p to $b"
    echo "@@backup-created"
  fi
  # A rollback copy left by a write never confirmed is older and known good: keep it.
  [ -e "$prev" ] || cp -p -- "$p" "$prev" || fail "cannot copy $p to $prev"
  if ! cat -- "$t" > "$p"; then
    cat -- "$prev" > "$p"
    fail "writing $p failed; its previous content was put back"
  fi
fi
cmp -s -- "$t" "$p" || fail "$p does not read back as written"
undo=
echo "@@written"
"""

# Puts the original back: the backup's bytes (and times) into the file in place (or a copy
# with the backup's owner and mode when the file is gone), or, when apull created the file,
# removes it.
# Then the backup (or marker) and any rollback copy go.
RESTORE_SCRIPT = r"""
fail() { echo "@@error $*"; exit 1; }
# The hosts.toml files apull wrote (still carrying its header), then their list.
if [ -f "$hl" ]; then
  while read -r f; do
    case "$f" in @created\ *) continue ;; esac
    [ -n "$f" ] && [ -f "$f" ] || continue
    if [ "$(head -n 1 -- "$f")" = "$hdr" ]; then
      rm -f -- "$f" || fail "cannot remove $f"
      rmdir -- "$(dirname -- "$f")" 2>/dev/null || true
    fi
  done < "$hl"
  sed -n 's/^@created //p' < "$hl" | while read -r dir; do rmdir -- "$dir" 2>/dev/null || true; done
  rm -f -- "$hl" || fail "cannot remove $hl"
  rm -rf -- "${hd%/}.apull-prev"
  echo "@@hosts-removed"
fi
if [ -e "$m" ]; then
  rm -f -- "$p" || fail "cannot remove $p"
  rm -f -- "$m" "$prev"
  echo "@@done"
elif [ -f "$b" ]; then
  if [ -f "$p" ]; then
    cat -- "$b" > "$p" || fail "cannot write $p"
    touch -r "$b" -- "$p" || true
  else
    cp -p -- "$b" "$p" || fail "cannot copy $b to $p"
  fi
  cmp -s -- "$b" "$p" || fail "$p does not read back as $b"
  rm -f -- "$b" "$prev"
  echo "@@done"
elif [ -n "$hostsonly" ]; then
  echo "@@done"
fi
"""


# The header k3s and rke2 put on the config.toml they regenerate from config.toml.tmpl.
_GENERATED = re.compile(r"^#\s*File generated by (k3s|rke2)\b.*DO NOT EDIT", re.M | re.I)
_SETTING = re.compile(rb"^[ \t]*[^# \t\r\n]", re.M)


def _has_settings(raw):
    """Whether a config's bytes hold any line that is neither blank nor a comment."""
    return _SETTING.search(raw) is not None


def _import_patch():
    """apull.containerd from the installed suite, else from this checkout's src/."""
    try:
        from apull.containerd import config_patch
    except ImportError:
        for parent in Path(__file__).resolve().parents:
            if (parent / "src/apull/containerd/config_patch.py").is_file():
                sys.path.insert(0, str(parent / "src"))
                break
        try:
            from apull.containerd import config_patch
        except ImportError as exc:
            raise AnsibleError(
                "containerd_config: cannot import apull.containerd (install the suite: "
                "make venv): %s" % exc
            ) from exc
    return config_patch


def _import_hosts():
    """apull.containerd.registry_hosts, found as _import_patch finds the patcher."""
    _import_patch()
    from apull.containerd import registry_hosts

    return registry_hosts


def _host_files(sections):
    """path -> bytes of the `@@section host:PATH` sections the scripts print."""
    return dict(
        (name[len("host:") :], data) for name, data in sections.items() if name.startswith("host:")
    )


def _sh(script):
    """One `sh -c` word: Ansible appends `&& sleep 0` to the command, which a multi-line
    script would not take."""
    return "/bin/sh -c " + shlex.quote(script)


def _shell_vars(**values):
    return "".join("%s=%s\n" % (name, shlex.quote(str(value))) for name, value in values.items())


def _parse(stdout):
    """`@@name value` lines, and the decoded bytes of each `@@section NAME`."""
    fields, sections, current = {}, {}, None
    for line in stdout.splitlines():
        if line.startswith("@@section "):
            current = line.split(" ", 1)[1]
            sections[current] = []
        elif line.startswith("@@"):
            current = None
            name, _, value = line[2:].partition(" ")
            fields[name] = value
        elif current is not None:
            sections[current].append(line.strip())
    return fields, dict((k, base64.b64decode("".join(v))) for k, v in sections.items())


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = True
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        path = args["path"]
        backup = args["backup_path"] or path + ".apull-orig"
        self._paths = dict(
            p=path,
            b=backup,
            m=backup + ".absent",
            prev=path + ".apull-prev",
            hl=path + ".apull-hosts",
            hd=args["registry_hosts_dir"],
        )
        result.update(
            path=path, backup_path=backup, previous_path=None, created=False, restart_pending=False
        )
        if args["state"] == "original":
            return self._restore(result)
        return self._patch(result, args)

    def _read(self, result, want_default, want_backup):
        """The read script's fields and sections, or None after filling in a failure."""
        path = self._paths["p"]
        res = self._run(
            READ_SCRIPT,
            want_default="1" if want_default else "0",
            want_backup="1" if want_backup else "0",
        )
        try:
            fields, sections = _parse(res["stdout"])
        except ValueError as exc:
            self._fail(result, "%s: unreadable answer from the node: %s" % (path, exc))
            return None
        if res["rc"] != 0 or "exists" not in fields:
            self._fail(result, "%s: cannot read it on the node: %s" % (path, _tail(res)))
            return None
        if fields["exists"] == "not-a-file":
            self._fail(result, "%s exists but is not a regular file" % path)
            return None
        result["containerd_version"] = _version(fields.get("version", ""))
        result["backup_exists"] = fields.get("backup") == "1"
        result["original_absent"] = fields.get("marker") == "1"
        if fields["exists"] == "1" and fields.get("stat"):
            uid, gid, mode, inode = [*fields["stat"].split(), "", "", "", ""][:4]
            result["stat"] = dict(uid=uid, gid=gid, mode=mode, inode=inode)
        return fields, sections, res

    def _patch(self, result, args):
        path = self._paths["p"]
        released = args["state"] == "released"
        read = self._read(result, want_default=True, want_backup=released)
        if read is None:
            return result
        fields, sections, res = read
        if released and fields.get("backup") != "1" and fields.get("marker") != "1":
            return result  # never patched (or restored already): nothing to release
        if not result["containerd_version"]:
            return self._fail(result, "%s: containerd is not installed on the node" % path)
        exists = fields["exists"] == "1"
        if "current" not in sections or fields.get("default-failed") is not None:
            return self._fail(result, "%s is missing and `containerd config default` failed" % path)
        raw = sections["current"]
        try:
            current = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._fail(result, "%s is not UTF-8 text: %s" % (path, exc))
        generator = _GENERATED.search(current[:4096])
        if generator:
            return self._fail(
                result,
                "%s is generated by %s from %s.tmpl at every start, so an edit here would be "
                "lost: put apull's settings (proxy_plugins.apull and the CRI image settings, "
                "see roles/containerd/README.md) into %s.tmpl and restart %s. Nothing was "
                "changed." % (path, generator.group(1), path, path, generator.group(1)),
            )

        patch, hosts_module = _import_patch(), _import_hosts()
        try:
            hosts_texts = hosts_module.hosts_files(
                args["insecure_registries"],
                args["registry_mirrors"],
                dial_timeout=args["registry_dial_timeout"]
                if hosts_module.reads_dial_timeout(result["containerd_version"])
                else "",
            )
        except hosts_module.RegistryHostsError as exc:
            return self._fail(result, "%s: %s" % (path, exc), key=exc.key)
        base, overrides, default = current, args["overrides"], args["set_default_snapshotter"]
        if "default" in sections and not _has_settings(raw):
            # A file without settings is containerd's defaults: patch those. The original
            # (as it is, empty or comments) is still what the backup keeps for uninstall.
            base = sections["default"].decode("utf-8", "replace")
        if released:
            # The original with the proxy plugin still in (containerd can still reach the
            # snapshotter, to remove what is on it), its own default snapshotter back.
            default = False
            if "backup" in sections and _has_settings(sections["backup"]):
                base = sections["backup"].decode("utf-8", "replace")
            elif "backup" in sections and "default" in sections:
                base = sections["default"].decode("utf-8", "replace")
            else:  # apull created the file: containerd's own default snapshotter
                overrides = dict(overrides)
                overrides[patch.cri_default_snapshotter_key(current)] = "overlayfs"
        try:
            patched = patch.patch_config(
                base,
                proxy_address=args["proxy_address"],
                snapshotter_name=args["snapshotter_name"],
                set_default_snapshotter=default,
                registry_hosts=list(hosts_texts),
                hosts_dir=args["registry_hosts_dir"],
                overrides=overrides,
                source=path if exists else "%s (containerd config default)" % path,
            )
        except patch.ConfigPatchError as exc:
            return self._fail(result, str(exc), key=exc.key)
        major = result["containerd_version"].split(".")[0]
        if patched.version == 3 and int(major) < 2:
            return self._fail(
                result,
                "%s is a version 3 config but containerd is %s, which reads versions 1 and 2 "
                "only" % (path, result["containerd_version"]),
                key="version",
            )
        result.update(
            version=patched.version,
            changes=[c.as_dict() for c in patched.changes],
            grpc_address=patch.grpc_address(patched.text),
            grpc_address_before=patch.grpc_address(current),
            # The text's sha256 once this task is done (apull status compares the node's file
            # with it: an edit by hand after the patch shows as drift).
            sha256=hashlib.sha256(patched.text.encode("utf-8")).hexdigest(),
        )
        result["original_absent"] = result["original_absent"] or not exists
        for note in patched.notes:
            self._display.warning("%s: %s" % (path, note))
        # A rollback copy still there means an earlier write was never confirmed by a
        # containerd restart (the run stopped in between): containerd may still run on the
        # text before it, so the caller restarts, and can roll back to that copy.
        if exists and fields.get("previous") == "1":
            result.update(restart_pending=True, previous_path=self._paths["prev"])
        hosts = self._hosts_plan(result, sections, patched.hosts_dir, hosts_texts)
        if hosts is None:
            return result
        result["registry_hosts_files"] = sorted(hosts["wanted"])
        config_changed = not exists or (patched.text != current if released else patched.changed)
        if not config_changed and not hosts["changed"]:
            return result

        result.update(changed=True, created=not exists, config_changed=config_changed)
        if self._task.diff:
            diffs = hosts["diffs"]
            if config_changed:
                config_diff = dict(
                    before=current if exists else "",
                    after=patched.text,
                    before_header=path if exists else "%s (absent)" % path,
                    after_header=path,
                )
                diffs = [config_diff, *diffs]
            result["diff"] = diffs[0] if len(diffs) == 1 else diffs
        if self._task.check_mode:
            return result

        hosts_root = patched.hosts_dir or hosts["rmroot"] or self._paths["hd"]
        snapshot = hosts_root.rstrip("/") + ".apull-prev" if hosts["changed"] else None
        encoded = base64.b64encode(patched.text.encode("utf-8")).decode("ascii")
        if len(encoded) > MAX_ENCODED:
            return self._fail(result, "%s: the patched file is too large to send" % path)
        res = self._run(
            WRITE_SCRIPT,
            cfg="1" if config_changed else "0",
            created="0" if exists else "1",
            sum=hashlib.sha256(raw).hexdigest() if exists else "",
            new=encoded if config_changed else "",
            hosts="\n".join(
                "%s %s" % (f, base64.b64encode(text.encode("utf-8")).decode("ascii"))
                for f, text in sorted(hosts["write"].items())
            ),
            stale="\n".join(hosts["stale"]),
            list="\n".join(hosts["list"]),
            rmroot=hosts["rmroot"],
            hroot=hosts_root,
            snap=snapshot or "",
        )
        if res["rc"] == 2:
            return self._fail(
                result,
                "containerd refuses the patched %s (`containerd config dump`: %s); %s was not "
                "changed" % (path, _tail(res), path),
            )
        if res["rc"] != 0 or "@@written" not in res["stdout"]:
            return self._fail(result, "%s: %s" % (path, _tail(res)))
        result["backup_created"] = "@@backup-created" in res["stdout"]
        result["marker_created"] = "@@marker-created" in res["stdout"]
        if snapshot:
            result["registry_hosts_previous"] = dict(
                snapshot=snapshot, dir=hosts_root, list=self._paths["hl"]
            )
        if exists and config_changed:
            result["previous_path"] = self._paths["prev"]
        return result

    def _hosts_plan(self, result, sections, hosts_dir, texts):
        """What to do with the registries' hosts.toml files: the files wanted, those to
        (re)write, the ones apull wrote earlier that are no longer wanted, and their diffs.
        None after filling in a failure (a file there that apull did not write)."""
        header = _import_hosts().MANAGED_HEADER
        wanted = dict(
            ("%s/%s/hosts.toml" % (hosts_dir, name), text) for name, text in texts.items()
        )
        found = _host_files(sections)
        missing = [f for f in wanted if f not in found]
        if missing and hosts_dir != self._paths["hd"]:
            # config.toml names another directory than the one read: read those files.
            res = self._run(
                'printf "%s\\n" "$files" | while IFS= read -r f; do\n'
                '  if [ -f "$f" ]; then echo "@@section host:$f"; base64 < "$f" || exit 3; fi\n'
                "done || exit 3\necho @@end",
                files="\n".join(missing),
            )
            if res["rc"] != 0 or "@@end" not in res["stdout"]:
                self._fail(result, "cannot read the hosts.toml files: %s" % _tail(res))
                return None
            found.update(_host_files(_parse(res["stdout"])[1]))
        lines = sections.get("hostslist", b"").decode("utf-8", "replace").splitlines()
        listed = set(line.strip() for line in lines if line.strip() and line[:1] != "@")
        created = [line.strip() for line in lines if line.startswith("@created ")]
        plan = dict(wanted=wanted, write={}, stale=[], diffs=[], changed=False)
        plan["list"] = sorted(wanted) + (created if wanted else [])
        plan["rmroot"] = created[0][len("@created ") :] if created and not wanted else ""
        for f, text in sorted(wanted.items()):
            old = found.get(f)
            if old is not None and not old.decode("utf-8", "replace").startswith(header):
                self._fail(
                    result,
                    "%s exists and was not written by apull: add these lines to it yourself, "
                    "or move it away and run again. Nothing was changed.\n%s" % (f, text),
                    key="registry_mirrors",
                )
                return None
            if old is None or old.decode("utf-8", "replace") != text:
                plan["write"][f] = text
                plan["diffs"].append(
                    dict(
                        before=old.decode("utf-8", "replace") if old is not None else "",
                        after=text,
                        before_header=f if old is not None else "%s (absent)" % f,
                        after_header=f,
                    )
                )
        for f in sorted(listed - set(wanted)):
            old = found.get(f)
            if old is not None and old.decode("utf-8", "replace").startswith(header):
                plan["stale"].append(f)
                plan["diffs"].append(
                    dict(
                        before=old.decode("utf-8", "replace"),
                        after="",
                        before_header=f,
                        after_header="%s (removed)" % f,
                    )
                )
        plan["changed"] = bool(plan["write"] or plan["stale"] or listed != set(wanted))
        return plan

    def _restore(self, result):
        path, backup = self._paths["p"], self._paths["b"]
        read = self._read(result, want_default=False, want_backup=True)
        if read is None:
            return result
        fields, sections, _res = read
        exists = fields["exists"] == "1"
        current = sections.get("current", b"")
        header = _import_hosts().MANAGED_HEADER
        listed = [
            f.strip()
            for f in sections.get("hostslist", b"").decode("utf-8", "replace").splitlines()
            if f.strip() and f[:1] != "@"
        ]
        hosts_diffs = [
            dict(
                before=sections["host:" + f].decode("utf-8", "replace"),
                after="",
                before_header=f,
                after_header="%s (removed)" % f,
            )
            for f in listed
            if sections.get("host:" + f, b"").decode("utf-8", "replace").startswith(header)
        ]
        if fields.get("marker") == "1":
            after, after_header = None, "%s (absent: apull created it)" % path
        elif fields.get("backup") == "1":
            if "backup" not in sections:
                return self._fail(result, "%s is not a regular file" % backup)
            after, after_header = sections["backup"], "%s (from %s)" % (path, backup)
        elif "hostslist" in sections:
            after, after_header = current, path  # only hosts.toml files are left to remove
        else:
            # Never patched (or already restored): nothing to do.
            return result
        # The file's content changes (containerd must be restarted) unless it already is
        # the original; the backup or marker goes either way.
        patch = _import_patch()
        original = after.decode("utf-8", "replace") if after is not None else ""
        result["grpc_address"] = patch.grpc_address(original)
        result["changed"] = True
        only_hosts = fields.get("marker") != "1" and fields.get("backup") != "1"
        result["config_changed"] = not only_hosts and (
            (after is None and exists) or (after is not None and (not exists or after != current))
        )
        result["registry_hosts_removed"] = [d["before_header"] for d in hosts_diffs]
        if self._task.diff:
            diffs = hosts_diffs
            if result["config_changed"]:
                config_diff = dict(
                    before=current.decode("utf-8", "replace") if exists else "",
                    after=original,
                    before_header=path if exists else "%s (absent)" % path,
                    after_header=after_header,
                )
                diffs = [config_diff, *diffs]
            result["diff"] = diffs[0] if len(diffs) == 1 else diffs
        if self._task.check_mode:
            return result
        res = self._run(RESTORE_SCRIPT, hdr=header, hostsonly="1" if only_hosts else "")
        if res["rc"] != 0 or "@@done" not in res["stdout"]:
            return self._fail(result, "%s: restoring the original failed: %s" % (path, _tail(res)))
        return result

    def _run(self, script, **values):
        variables = dict(self._paths, **values)
        return self._low_level_execute_command(_sh(_shell_vars(**variables) + script))

    def _fail(self, result, msg, key=None):
        result.update(failed=True, changed=False, msg=msg)
        if key:
            result["key"] = key
        return result


def _version(line):
    """1.6.20 from `containerd github.com/containerd/containerd 1.6.20~ds1 ...`."""
    match = re.search(r"\sv?(\d+\.\d+\.\d+)", " " + line)
    return match.group(1) if match else ""


def _tail(res, lines=6):
    """What went wrong: our `@@error` / `@@refused` lines, else the end of stderr."""
    ours = [
        line.split(" ", 1)[1] if " " in line else ""
        for line in (res.get("stdout") or "").splitlines()
        if line.startswith(("@@error ", "@@refused "))
    ]
    text = "\n".join(ours or (res.get("stderr") or "").strip().splitlines()[-lines:])
    return text.strip() or "exit code %s" % res.get("rc")
