# Copyright: apull-deploy contributors
# Apache License 2.0
"""Runs on the controller: the apull.sync engine over this task's Ansible connection."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import shlex

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase


class _AnsibleTransport:
    """apull.sync.engine.Transport over an action plugin's connection."""

    def __init__(self, action, uploads_as_root, tmpdir):
        self._action = action
        self.uploads_as_root = uploads_as_root
        self._tmpdir = tmpdir

    def run_script(self, script):
        res = self._action._low_level_execute_command("sh -c " + shlex.quote(script))
        if res.get("rc") != 0:
            stderr = (res.get("stderr") or res.get("stdout") or "").strip()[-300:]
            raise AnsibleActionFail("script failed (exit %s): %s" % (res.get("rc"), stderr))
        return res.get("stdout", "")

    def upload(self, local, remote):
        self._action._transfer_file(str(local), remote)

    def scratch_path(self, name):
        return "%s/%s" % (self._tmpdir, name)


class ActionModule(ActionBase):
    TRANSFERS_FILES = True
    _VALID_ARGS = frozenset(("bundle_dir", "prebuilt", "restart"))

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        from pathlib import Path

        from apull.bundle.artefacts import BundleError, load_bundle
        from apull.bundle.builder import ensure_bundle
        from apull.sync.engine import NodeSyncError, sync_node

        args = self._task.args
        bundle_dir = args.get("bundle_dir")
        try:
            if args.get("prebuilt"):
                if not bundle_dir:
                    raise AnsibleActionFail("prebuilt: true needs bundle_dir")
                bundle = load_bundle(Path(bundle_dir))
            else:
                bundle, _built = ensure_bundle(Path(bundle_dir) if bundle_dir else None)
        except BundleError as err:
            raise AnsibleActionFail(str(err)) from err

        whoami = self._low_level_execute_command("id -u", sudoable=False)
        uploads_as_root = whoami.get("stdout", "").strip() == "0"
        tmpdir = None if uploads_as_root else self._make_tmp_path()
        try:
            outcome = sync_node(
                _AnsibleTransport(self, uploads_as_root, tmpdir),
                bundle,
                check=self._task.check_mode,
                restart=bool(args.get("restart", False)),
            )
        except NodeSyncError as err:
            raise AnsibleActionFail(str(err)) from err
        finally:
            if tmpdir:
                self._remove_tmp_path(tmpdir)

        result["changed"] = outcome.changed
        result["binaries"] = dict(
            (
                s.binary.name,
                {
                    "action": s.action.value,
                    "sha256": s.binary.sha256,
                    "before": s.state.installed,
                    "path": s.binary.install_path,
                    "artefact": s.binary.platform,
                },
            )
            for s in outcome.steps
        )
        result["restart_needed"] = outcome.changed_services
        result["restarted"] = outcome.restarted
        result["bundle"] = {"version": bundle.version, "fingerprint": bundle.fingerprint}
        result["platform"] = str(outcome.platform)
        if self._task.diff and outcome.changed:
            result["diff"] = [
                {
                    "before_header": s.binary.install_path,
                    "after_header": "%s (bundle %s, build %s)"
                    % (s.binary.install_path, bundle.version, s.binary.platform),
                    "before": "sha256 %s\n" % s.state.installed,
                    "after": "sha256 %s\n" % s.binary.sha256,
                }
                for s in outcome.steps
                if s.changes
            ]
        return result
