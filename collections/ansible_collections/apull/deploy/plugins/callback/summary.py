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
    node (C(fscache), C(file) or C(none)) with the short reason.
  - Image conversions (M(apull.deploy.image_convert)) get a table of their own - source,
    target, status, layers, sizes, seconds - and a C(conversions) list in the JSON.
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


def backend_text(node):
    """fscache, file or none, with the short reason: 'file (EROFS file-backed, /dev/fuse)'."""
    backend = node.get("backend", "-")
    why = node.get("backend_why")
    return "%s (%s)" % (backend, why) if why else backend


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
        self.conversions = []
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
        if result._result.get("changed") and not result._task.no_log:
            self.changed[host].append(result._task.name or result._task.action)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        facts = result._result.get("ansible_facts", {})
        if "apull_platform" in facts:  # a refused node: its platform is the reason
            self.platforms[self._host(result)] = facts["apull_platform"]
        if not ignore_errors:
            # The first failure is the cause: a rescue that re-raises it (site.yml's verify
            # takes the node's labels off first) must not hide which task it was.
            self.failed.setdefault(self._host(result), result._task.get_name())

    def v2_runner_on_unreachable(self, result):
        self.failed[self._host(result)] = "unreachable"

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
                outcome = "FAILED at: " + self.failed[host]
            elif changed:
                verb = "would change" if self.check_mode else "changed"
                outcome = "%s %d: %s" % (verb, len(changed), ", ".join(changed))
            else:
                outcome = "no change"
            problems = list(node.get("problems") or [])
            refused = self.platforms.get(host, {}).get("why")
            if refused:
                problems.insert(0, {"what": refused})
            yield {
                "host": host,
                "platform": self.platforms.get(host, {}).get("text", "-"),
                "kernel": node.get("kernel", "-"),
                "containerd": node.get("containerd") or "-",
                "backend": backend_text(node) if node else "-",
                "ondemand": node.get("ondemand", "-"),
                "fs_ctl": "/".join(fs_ctl.get(k) or "?" for k in sorted(fs_ctl)) if fs_ctl else "-",
                "problems": "; ".join(p["what"] for p in problems) if problems else "none",
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
        table(self._display, "APULL NODE STATUS", columns, rows)
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
            "rows": rows,
            "conversions": self.conversions,
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
