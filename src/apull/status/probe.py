"""The controller's side of the node probe (apull_node.report.node_status): the command that
runs it with the node's python3, and its output read back."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from apull_node.report import node_status

#: The units whose state status reports (the snapshotter's, apulld's and containerd's).
SERVICES = ("apulld.service", "apull-snapshotter.service", "containerd.service")
SNAPSHOTTER = "apull"
#: Errors and warnings of this long ago and newer are shown.
ERRORS_SINCE = "-1h"
_HEREDOC = "APULL_STATUS_PROBE"


class ProbeError(Exception):
    """The probe ran but its output is not a report; the message says what came back."""


def probe_script(binaries: list[str]) -> str:
    """An sh script that runs the probe with /usr/bin/python3 (the binaries' interpreter)."""
    source = Path(node_status.__file__).read_text()
    if _HEREDOC in source:  # cannot happen unless the probe names the delimiter itself
        raise ProbeError(f"the probe's text contains {_HEREDOC}")
    args = {
        "binaries": binaries,
        "services": list(SERVICES),
        "snapshotter": SNAPSHOTTER,
        "errors_since": ERRORS_SINCE,
    }
    return (
        f"exec /usr/bin/python3 - {shlex.quote(json.dumps(args))} <<'{_HEREDOC}'\n"
        f"{source}\n{_HEREDOC}\n"
    )


def parse_report(output: str) -> dict[str, Any]:
    """The report the probe printed after its marker (shell noise before it is skipped)."""
    lines = output.splitlines()
    if node_status.MARKER not in lines:
        raise ProbeError(f"no report in the probe's output: {output.strip()[-300:]!r}")
    text = "\n".join(lines[lines.index(node_status.MARKER) + 1 :])
    try:
        report = json.loads(text)
    except ValueError as err:
        raise ProbeError(f"the probe's report is not JSON: {err}") from None
    if not isinstance(report, dict) or report.get("probe") != node_status.PROBE_VERSION:
        raise ProbeError(f"not a version {node_status.PROBE_VERSION} probe report")
    return report
