# Copyright: apull-deploy contributors
# Apache License 2.0
"""Ansible's linear strategy over Mitogen connections: one Python interpreter per node for
the whole run instead of one per task (the suite's default; APULL_MITOGEN=0 turns it off).

Each task still runs in a process of its own, forked from that interpreter
(inventory/group_vars/all.yml sets mitogen_task_isolation: fork), so no module sees what an
earlier one left behind in the interpreter."""

from __future__ import annotations

DOCUMENTATION = r"""
name: mitogen_linear
short_description: Ansible's linear strategy with Mitogen's connections
description:
  - Runs the play as C(ansible.builtin.linear) does, with the connections, module runner
    and file transfer of Mitogen for Ansible (the C(mitogen) package, a dependency of the
    suite).
  - Turn it off with C(APULL_MITOGEN=0) (C(apull run)) or C(ANSIBLE_STRATEGY=linear).
"""

# Mitogen's strategy is loaded under its own module name, once, and its loader's linear
# strategy is the base: the mixin swaps in Mitogen's connection and action plugins.
import ansible_mitogen.loaders
import ansible_mitogen.strategy

_LINEAR = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _LINEAR):
    """The linear strategy, run over Mitogen."""
