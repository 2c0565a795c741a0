# Copyright: apull-deploy contributors
# Apache License 2.0
"""Ends every run with one table per node: what the node is and what the run changed."""

from __future__ import annotations

DOCUMENTATION = r"""
name: summary
type: aggregate
short_description: Per-node status table and JSON report at the end of a run
description:
  - Collects C(apull_node) facts (from M(apull.deploy.node_facts)) and the names of the tasks
    that changed something on each host, prints a table after the recap and writes the same
    data as JSON.
  - The node table's BACKEND column is the cache backend apulld uses or would choose on the
    node (C(fscache), C(file) or C(none)) with the reason, shortened at a word boundary
    (ending in an ellipsis) when long; the JSON report keeps every text whole.
  - The ONDEMAND column names the evidence that decided the on-demand state (its
    C(ondemand_source)); where the kernel config contradicts it, a note under the table says
    why (its C(ondemand_note)).
  - A host that cannot be reached is named by its inventory name; its outcome is
    C(UNREACHABLE at) the task it was lost at, then ssh's own error text, or when ssh gave
    none, what a TCP connection to its address and port finds there. Passwords never appear.
  - Image conversions (M(apull.deploy.image_convert)) get a table of their own - source,
    target, status, layers, sizes, seconds - and a C(conversions) list in the JSON.
  - Prewarms (M(apull.deploy.image_prewarm)) get one too, a row per node and image - state,
    the share cached, the start-up set's share, bytes fetched, seconds, the reason of a
    failure - and a C(prewarm) list in the JSON.
requirements:
  - enable in ansible.cfg (C(callbacks_enabled))
options:
  report_path:
    description: >-
      Directory for the JSON reports, C(<playbook>-<time>.json) per run and
      C(<playbook>-last.json).
    default: .apull/reports
    env:
      - name: APULL_REPORT_DIR
    type: path
"""

import json
import os
import re
import socket
import time

from ansible.plugins.callback import CallbackBase
from ansible_collections.apull.deploy.plugins.module_utils.sizes import size_text

CONVERSION_KEYS = (
    "source",
    "target",
    "status",
    "reason",
    "layers",
    "layers_uploaded",
    "source_bytes",
    "target_bytes",
    "seconds",
    "source_manifest",
    "target_manifest",
)


ELLIPSIS = "\u2026"
# The table's widest reason in the BACKEND column; the JSON report keeps it whole.
BACKEND_WHY_WIDTH = 60
# Ansible's own words around ssh's error text in an unreachable host's message, and
# Mitogen's (the suite's strategy: "EOF on stream; last 100 lines received:").
SSH_ERROR_PREFIX = re.compile(
    r"^.*?(?:Make sure this host can be reached over ssh|Failed to connect to the host via ssh"
    r"|EOF on stream; last \d+ lines received)\s*:[ \t]*",
    re.S,
)
# ssh's lines that are not the error.
SSH_NOISE = re.compile(
    r"^(Warning: Permanently added |\*\* |Connection to \S+ closed\.$)|post-quantum|"
    r"store now, decrypt later|openssh\.com/pq\.html"
)
PASSWORD_VARS = (
    "ansible_password",
    "ansible_ssh_pass",
    "ansible_ssh_password",
    "ansible_become_password",
    "ansible_become_pass",
)
SSH_CONNECTIONS = (None, "", "ssh", "smart", "paramiko", "paramiko_ssh", "ansible.builtin.ssh")


def shorten(text, width):
    """One line of at most `width` characters, cut at a word boundary and ending in an
    ellipsis when the text is longer. A first word longer than `width` is kept whole."""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    cut = text[: width - 1]  # room for the ellipsis
    if text[width - 1] != " ":  # the cut is inside a word: drop that word
        space = cut.rfind(" ")
        if space <= 0:
            return text.split(" ", 1)[0] + ELLIPSIS
        cut = cut[:space]
    return cut.rstrip(" ,;:(-") + ELLIPSIS


def backend_text(node, width=None):
    """fscache, file or none, with the reason: 'file (EROFS file-backed + /dev/fuse)'; the
    reason shortened to `width` at a word boundary when given."""
    backend = node.get("backend", "-")
    why = node.get("backend_why")
    if why and width:
        why = shorten(why, width)
    return "%s (%s)" % (backend, why) if why else backend


def ondemand_text(node):
    """The on-demand state with the evidence that decided it: 'enabled (fs_ctl gate)'."""
    state = node.get("ondemand", "-")
    source = (node.get("ondemand_source") or "").split(" (", 1)[0]
    if not source or source in state:
        return state
    return "%s (%s)" % (state, source)


def redact(text, secrets):
    """The text with every secret (and any password=VALUE) replaced by ********."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "********")
    return re.sub(r"(?i)\b(pass(?:word|wd)?)=[^\s;,]+", r"\1=********", text)


def tcp_answer(address, port, timeout=3.0):
    """What answers on address:port, worded as the reason a connection failed."""
    try:
        sock = socket.create_connection((address, int(port)), timeout=timeout)
    except socket.timeout:
        return "timed out (no answer from %s:%s in %g s)" % (address, port, timeout)
    except (OSError, ValueError) as exc:
        return "%s (%s:%s)" % (getattr(exc, "strerror", None) or exc, address, port)
    try:
        banner = sock.recv(256)
    except socket.timeout:
        return "%s:%s accepts connections but sends no SSH banner in %g s" % (
            address,
            port,
            timeout,
        )
    except OSError as exc:
        return "%s:%s accepts connections, then: %s" % (address, port, exc.strerror or exc)
    finally:
        sock.close()
    if not banner:
        return (
            "%s:%s accepts connections but closes them without an SSH banner "
            "(sshd not running yet?)" % (address, port)
        )
    if banner.startswith(b"SSH-"):
        text = banner.split(b"\n", 1)[0].decode("ascii", "replace").strip()
        return "sshd answers on %s:%s (%s), yet ssh failed without an error text" % (
            address,
            port,
            text,
        )
    return "%s:%s answers, but not as an SSH server" % (address, port)


def unreachable_reason(message, name, address=None, port=None, secrets=(), probe=tcp_answer):
    """The reason a host could not be reached: ssh's own error text out of Ansible's message
    (which names the host by its address), else what answers on its address and port."""
    text = message or ""
    match = SSH_ERROR_PREFIX.match(text)
    if match:
        text = text[match.end() :]
    elif address:
        # Ansible's other wordings name the remote host by its address.
        where = "%s (%s)" % (name, "%s:%s" % (address, port) if port else address)
        text = text.replace('remote host "%s"' % address, where)
        text = text.replace('host "%s"' % address, where)
    lines = [line.strip() for line in text.splitlines()]
    text = "; ".join(line for line in lines if line and not SSH_NOISE.search(line))
    if not text and address and port and probe is not None:
        text = "ssh gave no error text; " + probe(address, port)
    return redact(text or "ssh gave no error text", secrets)


def plain(value):
    """A host var as written in the inventory: a string without a template, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value and "{{" not in value and "{%" not in value:
        return value
    return None


def config_secrets(template):
    """The values behind apull.deploy.config_secret lookups in a template, or []."""
    terms = re.findall(r"config_secret['\"]\s*,\s*['\"](\w+)", template)
    if not terms:
        return []
    try:
        from ansible.plugins.loader import lookup_loader

        return list(lookup_loader.get("apull.deploy.config_secret").run(terms))
    except Exception:  # no secret to be found: nothing to hide
        return []


def host_secrets(host_vars):
    """Passwords the connection may use, so that no reason shows them."""
    found = []
    for key in PASSWORD_VARS:
        value = host_vars.get(key)
        if plain(value) is not None:
            found.append(plain(value))
        elif isinstance(value, str):
            found.extend(config_secrets(value))
    return found


def share(part, whole):
    return "%d%%" % (100 * (part or 0) // whole) if whole else "-"


def prewarm_row(entry):
    """A prewarm table row: one image on one node."""
    state = entry.get("state") or "?"
    if entry.get("pulled"):
        state += " (pulled)"
    if entry.get("lazy") is False:
        state += " (not converted)"
    return {
        "host": entry.get("host"),
        "image": entry.get("image"),
        "state": state,
        "cached": share(entry.get("cached"), entry.get("bytes")),
        "startup": share(entry.get("startup_cached"), entry.get("startup_bytes")),
        "fetched": size_text(entry.get("fetched")) if entry.get("fetched") else "0",
        "time": "%.1fs" % (entry.get("seconds") or 0),
        "reason": entry.get("error") or "",
    }


def table(display, title, columns, rows):
    widths = dict((c, max(len(c), *(len(str(r[c])) for r in rows))) for c in columns)
    display.banner(title)
    display.display("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        display.display("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "apull.deploy.summary"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.nodes = {}
        self.platforms = {}
        self.changed = {}
        self.failed = {}
        self.unreachable = {}
        self.conversions = []
        self.prewarm = []
        self.playbook = "run"
        self.check_mode = False
        self.started = time.time()

    def v2_playbook_on_start(self, playbook):
        self.playbook = os.path.splitext(os.path.basename(playbook._file_name))[0]

    def v2_playbook_on_play_start(self, play):
        self.check_mode = bool(play.check_mode) or self.check_mode

    def _host(self, result):
        return result._host.get_name()

    def v2_runner_on_ok(self, result):
        host = self._host(result)
        facts = result._result.get("ansible_facts", {})
        if "apull_node" in facts:
            self.nodes[host] = facts["apull_node"]
        if "apull_platform" in facts:
            self.platforms[host] = facts["apull_platform"]
        self.changed.setdefault(host, [])
        if result._task.action.endswith("image_convert"):
            for item in result._result.get("results", [result._result]):
                if "status" in item:
                    self.conversions.append(
                        dict((k, item.get(k)) for k in CONVERSION_KEYS if k in item)
                    )
        self._prewarmed(host, result)
        if result._result.get("changed") and not result._task.no_log:
            self.changed[host].append(result._task.name or result._task.action)

    def _prewarmed(self, host, result):
        if result._task.action.endswith("image_prewarm"):
            for item in result._result.get("images") or []:
                self.prewarm.append(dict(item, host=host))

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._prewarmed(self._host(result), result)
        facts = result._result.get("ansible_facts", {})
        if "apull_platform" in facts:  # a refused node: its platform is the reason
            self.platforms[self._host(result)] = facts["apull_platform"]
        if not ignore_errors:
            # The first failure is the cause: a rescue that re-raises it (site.yml's verify
            # takes the node's labels off first) must not hide which task it was.
            self.failed.setdefault(self._host(result), "FAILED at: " + result._task.get_name())

    def v2_runner_on_unreachable(self, result):
        host = self._host(result)
        task = result._task.get_name()
        host_vars = getattr(result._host, "vars", None) or {}
        address = plain(host_vars.get("ansible_host")) or getattr(result._host, "address", None)
        port = plain(host_vars.get("ansible_port") or host_vars.get("ansible_ssh_port")) or "22"
        if plain(host_vars.get("ansible_connection")) not in SSH_CONNECTIONS:
            port = None  # not an ssh connection: no port to ask
        reason = unreachable_reason(
            str(result._result.get("msg") or ""),
            host,
            address,
            port,
            host_secrets(host_vars),
        )
        # As with a failure, the first is the cause.
        self.unreachable.setdefault(
            host,
            {
                "task": task,
                "reason": reason,
                "address": "%s:%s" % (address, port) if port else address,
            },
        )
        self.failed.setdefault(host, "UNREACHABLE at: %s: %s" % (task, reason))

    def _rows(self):
        hosts = sorted(set(self.nodes) | set(self.platforms) | set(self.changed) | set(self.failed))
        # The controller's own plays (site.yml's cluster clean-up) get a row only when they
        # changed or failed something: the table is about the nodes.
        quiet = not self.changed.get("localhost") and "localhost" not in self.failed
        if len(hosts) > 1 and "localhost" in hosts and quiet:
            hosts.remove("localhost")
        for host in hosts:
            node = self.nodes.get(host, {})
            fs_ctl = node.get("fs_ctl")
            changed = self.changed.get(host, [])
            if host in self.failed:
                outcome = self.failed[host]
            elif changed:
                verb = "would change" if self.check_mode else "changed"
                outcome = "%s %d: %s" % (verb, len(changed), ", ".join(changed))
            else:
                outcome = "no change"
            problems = list(node.get("problems") or [])
            refused = self.platforms.get(host, {}).get("why")
            if refused:
                problems.insert(0, {"what": refused})
            if problems:
                problems_text = "; ".join(p["what"] for p in problems)
            else:
                # No facts from a host lost before preflight read it: nothing is known.
                lost = host in self.unreachable and not node
                problems_text = "unknown (unreachable)" if lost else "none"
            yield {
                "host": host,
                "platform": self.platforms.get(host, {}).get("text", "-"),
                "kernel": node.get("kernel", "-"),
                "containerd": node.get("containerd") or "-",
                "backend": backend_text(node) if node else "-",
                "ondemand": ondemand_text(node) if node else "-",
                "ondemand_note": node.get("ondemand_note") or "",
                "fs_ctl": "/".join(fs_ctl.get(k) or "?" for k in sorted(fs_ctl)) if fs_ctl else "-",
                "problems": problems_text,
                "outcome": outcome,
            }

    def v2_playbook_on_stats(self, stats):
        rows = list(self._rows())
        if self.conversions:
            conversions = [
                dict(
                    c,
                    **{"layers(up)": "%s (%s)" % (c.get("layers"), c.get("layers_uploaded"))},
                    sizes="%s -> %s"
                    % (size_text(c.get("source_bytes")), size_text(c.get("target_bytes"))),
                    time="%.1fs" % (c.get("seconds") or 0),
                )
                for c in self.conversions
            ]
            table(
                self._display,
                "APULL IMAGE CONVERSIONS",
                ("source", "target", "status", "layers(up)", "sizes", "time"),
                conversions,
            )
        if self.prewarm:
            table(
                self._display,
                "APULL PREWARM",
                ("host", "image", "state", "cached", "startup", "fetched", "time", "reason"),
                [prewarm_row(p) for p in self.prewarm],
            )
        if not rows:
            return
        # A run on the controller alone (convert.yml) has no node facts: outcome only.
        if self.nodes or self.platforms:
            columns = (
                "host",
                "platform",
                "kernel",
                "containerd",
                "backend",
                "ondemand",
                "fs_ctl",
                "problems",
                "outcome",
            )
        else:
            columns = ("host", "outcome")
        # The table shortens the backend's reason at a word boundary; the report keeps it.
        shown = [
            dict(row, backend=backend_text(self.nodes[row["host"]], BACKEND_WHY_WIDTH))
            if row["host"] in self.nodes
            else row
            for row in rows
        ]
        table(self._display, "APULL NODE STATUS", columns, shown)
        for row in rows:
            if row["ondemand_note"] and "ondemand" in columns:
                self._display.display("note: %s: %s" % (row["host"], row["ondemand_note"]))
        self._write_report(rows)

    def _write_report(self, rows):
        """<dir>/<playbook>-<UTC time>.json for every run, and <playbook>-last.json."""
        target = self.get_option("report_path")
        if not target:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        report = {
            "playbook": self.playbook,
            "check_mode": self.check_mode,
            "finished": stamp,
            "seconds": round(time.time() - self.started, 1),
            "nodes": dict((h, self.nodes.get(h)) for h in sorted(self.nodes)),
            "platforms": dict((h, self.platforms[h]) for h in sorted(self.platforms)),
            "unreachable": dict((h, self.unreachable[h]) for h in sorted(self.unreachable)),
            "rows": rows,
            "conversions": self.conversions,
            "prewarm": self.prewarm,
        }
        try:
            os.makedirs(target, exist_ok=True)
            path = os.path.join(target, "%s-%s.json" % (self.playbook, stamp))
            for name in (path, os.path.join(target, "%s-last.json" % self.playbook)):
                with open(name, "w") as handle:
                    json.dump(report, handle, indent=2, sort_keys=True)
            self._display.display("report: %s" % path)
        except OSError as exc:
            self._display.warning("could not write the run report in %s: %s" % (target, exc))
