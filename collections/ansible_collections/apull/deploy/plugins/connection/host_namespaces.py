# Copyright: apull-deploy contributors
# Apache License 2.0
"""Run tasks on the host of a privileged container: every command through nsenter into the
namespaces of the host's init (the chart's DaemonSet, charts/apull)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: host_namespaces
short_description: Run tasks on the host that a privileged, hostPID container runs on
description:
  - For Ansible running in a Kubernetes pod (or a unit) on the node it configures, as the
    chart C(charts/apull) does. Every command runs through C(nsenter) in the mount, UTS,
    IPC, network and PID namespaces of a host process (the host's init by default), so the
    roles act on the host's files, systemd and containerd exactly as they do over SSH.
  - Files are copied in and out through the same C(nsenter), as a stream (C(cat)); nothing
    needs to be shared between the container and the host.
  - Needs C(nsenter) (util-linux) where Ansible runs, a host PID namespace, and the
    privileges to enter the namespaces (CAP_SYS_ADMIN, CAP_SYS_PTRACE); the host needs
    C(/bin/sh) and the Python the modules run with.
author: apull-deploy
options:
  target_pid:
    description: The host process whose namespaces are entered (as the host sees it).
    type: int
    default: 1
    vars:
      - name: apull_host_namespaces_pid
  pipelining:
    description:
      - Send modules through the command's standard input instead of copying them to the
        host first (one nsenter instead of four per module).
    type: boolean
    default: true
    env:
      - name: ANSIBLE_PIPELINING
    vars:
      - name: ansible_pipelining
  nsenter:
    description: The nsenter program where Ansible runs.
    type: str
    default: nsenter
    vars:
      - name: apull_host_namespaces_nsenter
"""

import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_native
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()


class Connection(ConnectionBase):
    """Commands and files through nsenter into the host's namespaces."""

    transport = "apull.deploy.host_namespaces"
    has_pipelining = True

    def _argv(self, *command):
        pid = str(self.get_option("target_pid"))
        namespaces = ["--mount", "--uts", "--ipc", "--net", "--pid"]
        return [self.get_option("nsenter"), "--target", pid, *namespaces, "--", *command]

    def _connect(self):
        if not self._connected:
            probe = subprocess.run(
                self._argv("/bin/sh", "-c", "true"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
            if probe.returncode != 0:
                raise AnsibleConnectionFailure(
                    "cannot enter the namespaces of host pid %s: %s (the container needs "
                    "hostPID and privileges)"
                    % (self.get_option("target_pid"), to_native(probe.stderr).strip())
                )
            self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super(Connection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        display.vvv("HOST NS EXEC %s" % cmd, host=self._play_context.remote_addr)
        proc = subprocess.Popen(
            self._argv("/bin/sh", "-c", cmd),
            stdin=subprocess.PIPE if in_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = proc.communicate(in_data)
        return proc.returncode, stdout, stderr

    def put_file(self, in_path, out_path):
        super(Connection, self).put_file(in_path, out_path)
        self._connect()
        host = self._play_context.remote_addr
        display.vvv("HOST NS PUT %s TO %s" % (in_path, out_path), host=host)
        try:
            with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as source:
                res = subprocess.run(
                    self._argv("/bin/sh", "-c", 'cat > "$1"', "sh", out_path),
                    stdin=source,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
        except OSError as err:
            raise AnsibleError("cannot read %s: %s" % (in_path, to_native(err))) from err
        if res.returncode != 0:
            raise AnsibleError(
                "failed to put %s to %s on the host: %s"
                % (in_path, out_path, to_native(res.stderr).strip())
            )

    def fetch_file(self, in_path, out_path):
        super(Connection, self).fetch_file(in_path, out_path)
        self._connect()
        host = self._play_context.remote_addr
        display.vvv("HOST NS FETCH %s TO %s" % (in_path, out_path), host=host)
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as target:
            res = subprocess.run(
                self._argv("cat", "--", in_path),
                stdin=subprocess.DEVNULL,
                stdout=target,
                stderr=subprocess.PIPE,
                check=False,
            )
        if res.returncode != 0:
            raise AnsibleError(
                "failed to fetch %s from the host: %s" % (in_path, to_native(res.stderr).strip())
            )

    def close(self):
        self._connected = False
