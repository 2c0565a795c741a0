# Copyright: apull-deploy contributors
# Apache License 2.0
"""Where a run's time goes: wall time per task and per role, and per host within a task."""

from __future__ import annotations

DOCUMENTATION = r"""
name: timing
type: aggregate
short_description: Wall time per task, per role and per play, slowest first
description:
  - Times every task from its start until its last host answered (the wall time the run
    spent on it), with each host's own time, and sums the tasks by role and by play.
  - At the end of the run it prints the slowest tasks and the roles by total, and writes
    the whole record as JSON to C(<report_path>/<playbook>-timing.json).
  - C(apull run --profile ...) and C(APULL_PROFILE=1 make all) turn it on.
requirements:
  - enable in ansible.cfg (C(callbacks_enabled)) or ANSIBLE_CALLBACKS_ENABLED
options:
  report_path:
    description: Directory for the JSON record.
    default: .apull/reports
    env:
      - name: APULL_REPORT_DIR
    type: path
  top:
    description: How many of the slowest tasks to print.
    default: 25
    env:
      - name: APULL_PROFILE_TOP
    type: int
"""

import json
import os
import time

from ansible.plugins.callback import CallbackBase


class TaskTime:
    """One task of the run: when it started, when each host finished it."""

    def __init__(self, play, name, role, action, started):
        self.play = play
        self.name = name
        self.role = role
        self.action = action
        self.started = started
        self.ended = started
        self.hosts = {}  # host -> seconds

    def host_done(self, host, now):
        self.hosts[host] = now - self.started
        self.ended = max(self.ended, now)

    @property
    def wall(self):
        return self.ended - self.started

    def as_dict(self):
        return {
            "play": self.play,
            "task": self.name,
            "role": self.role,
            "action": self.action,
            "wall_seconds": round(self.wall, 3),
            "hosts": {h: round(s, 3) for h, s in sorted(self.hosts.items())},
        }


def totals(tasks, key):
    """Wall seconds and task count by `key` (a TaskTime attribute), largest first."""
    sums = {}
    for task in tasks:
        name = getattr(task, key) or "(no role)"
        seconds, count = sums.get(name, (0.0, 0))
        sums[name] = (seconds + task.wall, count + 1)
    return sorted(sums.items(), key=lambda item: -item[1][0])


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "apull.deploy.timing"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.tasks = []
        self.play = ""
        self.playbook = "run"
        self.run_started = time.monotonic()

    def v2_playbook_on_start(self, playbook):
        self.playbook = os.path.splitext(os.path.basename(playbook._file_name))[0]
        self.run_started = time.monotonic()

    def v2_playbook_on_play_start(self, play):
        self.play = play.get_name().strip()

    def _start(self, task):
        role = task._role.get_name() if task._role else ""
        name = (task.name or task.action).strip()
        self.tasks.append(TaskTime(self.play, name, role, task.action, time.monotonic()))

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._start(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._start(task)

    def _done(self, result):
        if self.tasks:
            self.tasks[-1].host_done(result._host.get_name(), time.monotonic())

    v2_runner_on_ok = _done
    v2_runner_on_skipped = _done
    v2_runner_on_unreachable = _done

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._done(result)

    def v2_playbook_on_stats(self, stats):
        total = time.monotonic() - self.run_started
        timed = [t for t in self.tasks if t.hosts]
        top = int(self.get_option("top"))
        lines = ["", "TIMING (%s: %.1f s, %d tasks)" % (self.playbook, total, len(timed))]
        for task in sorted(timed, key=lambda t: -t.wall)[:top]:
            where = "%s : " % task.role if task.role else ""
            lines.append("  %7.2f s  %s%s" % (task.wall, where, task.name))
        lines.append("by role:")
        for name, (seconds, count) in totals(timed, "role"):
            lines.append("  %7.2f s  %-16s %3d tasks" % (seconds, name, count))
        lines.append("by play:")
        for name, (seconds, count) in totals(timed, "play"):
            lines.append("  %7.2f s  %-32s %3d tasks" % (seconds, name, count))
        self._display.display("\n".join(lines))
        record = {
            "playbook": self.playbook,
            "total_seconds": round(total, 3),
            "tasks": [t.as_dict() for t in timed],
            "roles": {n: round(s, 3) for n, (s, _) in totals(timed, "role")},
            "plays": {n: round(s, 3) for n, (s, _) in totals(timed, "play")},
        }
        directory = self.get_option("report_path")
        try:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "%s-timing.json" % self.playbook)
            with open(path, "w") as handle:
                json.dump(record, handle, indent=1)
        except OSError as exc:
            self._display.warning("timing: could not write the record: %s" % exc)
