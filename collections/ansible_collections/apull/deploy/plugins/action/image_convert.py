# Copyright: apull-deploy contributors
# Apache License 2.0
"""Runs on the controller: apull-image-build convert, its progress shown as it goes."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import subprocess
import sys
import time

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible_collections.apull.deploy.plugins.module_utils.sizes import size_text

display = Display()

ARGUMENT_SPEC = {
    "source": {"type": "str", "required": True},
    "target": {"type": "str", "required": True},
    "source_insecure": {"type": "bool", "default": False},
    "target_insecure": {"type": "bool", "default": False},
    "chunk_size": {"type": "str", "default": "256K"},
    "platform": {"type": "str", "default": "linux/amd64"},
    "auth_file": {"type": "path"},
    "work_dir": {"type": "path"},
}


def converter_command(args, check_mode):
    """The converter's command line (the controller's own Python, so the suite's code)."""
    cmd = [sys.executable, "-m", "apull.image.cli", "convert", "--json"]
    cmd += ["--source", args["source"], "--target", args["target"]]
    cmd += ["--chunk-size", args["chunk_size"], "--platform", args["platform"]]
    cmd.append("--check" if check_mode else "--skip-if-current")
    for flag in ("source_insecure", "target_insecure"):
        if args[flag]:
            cmd.append("--" + flag.replace("_", "-"))
    for option in ("auth_file", "work_dir"):
        if args.get(option):
            cmd += ["--" + option.replace("_", "-"), args[option]]
    return cmd


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        _, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        check_mode = bool(self._play_context.check_mode)
        label = "%s -> %s" % (args["source"], args["target"])
        started = time.monotonic()
        tail = []
        try:
            proc = subprocess.Popen(
                converter_command(args, check_mode),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                universal_newlines=True,
            )
        except OSError as err:
            raise AnsibleActionFail("cannot run the converter: %s" % err) from err
        for line in proc.stderr:
            line = line.rstrip()
            tail = [*tail, line][-20:]
            # Progress as it happens: one line per step and per layer.
            display.display("  [%s] %s" % (label, line))
        out = proc.stdout.read()
        rc = proc.wait()
        if rc != 0:
            raise AnsibleActionFail(
                "converting %s failed (exit %d): %s" % (label, rc, "\n".join(tail[-5:]))
            )
        try:
            summary = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as err:
            raise AnsibleActionFail("no JSON summary from the converter: %r" % out[-300:]) from err
        status = summary["status"]
        result.update(summary)
        result["elapsed"] = round(time.monotonic() - started, 2)
        result["changed"] = status in ("converted", "would convert")
        figures = "%d layers, %s -> %s" % (
            summary["layers"],
            size_text(summary["source_bytes"]),
            size_text(summary["target_bytes"]),
        )
        if status == "converted":
            result["msg"] = "converted %s in %.1fs: %s (%d uploaded), manifest %s" % (
                label,
                summary["seconds"],
                figures,
                summary["layers_uploaded"],
                summary["target_manifest"],
            )
        elif status == "current":
            result["msg"] = "%s: current (%s)" % (label, summary["reason"])
        else:
            result["msg"] = "%s: would convert (%s), source %s" % (
                label,
                summary["reason"],
                figures.split(",")[0],
            )
        if result["changed"] and self._task.diff:
            before = summary["previous_target_manifest"] or "absent"
            result["diff"] = {
                "before_header": args["target"],
                "after_header": args["target"],
                "before": "%s: %s\n" % (args["target"], before),
                "after": "%s: conversion of %s (%s)\n"
                % (args["target"], summary["source_manifest"], summary["reason"]),
            }
        return result
