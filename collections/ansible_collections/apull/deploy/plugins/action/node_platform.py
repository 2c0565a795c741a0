# Copyright: apull-deploy contributors
# Apache License 2.0
"""Runs on the controller: the installers' platform probe over this task's connection."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import shlex

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    _VALID_ARGS = frozenset(("enforce",))

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        from apull.bundle.artefacts import check_supported
        from apull.sync import remote_scripts

        script = remote_scripts.platform_script()
        res = self._low_level_execute_command("sh -c " + shlex.quote(script))
        lines = remote_scripts.after_marker(res.get("stdout", ""))
        node = remote_scripts.parse_platform(lines[0]) if lines else None
        if res.get("rc") != 0 or node is None:
            stderr = (res.get("stderr") or res.get("stdout") or "").strip()[-300:]
            raise AnsibleActionFail(
                "the platform probe failed (exit %s): %s" % (res.get("rc"), stderr)
            )
        why = check_supported(node)
        result["changed"] = False
        result["ansible_facts"] = {
            "apull_platform": {
                "arch": node.arch,
                "glibc": node.glibc,
                "python": node.python,
                "text": str(node),
                "supported": not why,
                "why": why,
            }
        }
        if why and self._task.args.get("enforce", True):
            result["failed"] = True
            result["msg"] = "%s: %s (nothing on it was changed)" % (
                task_vars.get("inventory_hostname", "node") if task_vars else "node",
                why,
            )
        return result
