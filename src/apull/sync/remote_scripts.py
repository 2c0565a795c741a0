"""The POSIX sh scripts an installer runs on a node (fed on stdin to `sh -s`, run as root)."""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from apull.bundle.artefacts import BuiltBinary, NodePlatform

#: Printed first by every script, so output before it (motd, shell noise) is ignored.
MARKER = "--apull--"

#: Prints `platform<TAB>arch<TAB>glibc<TAB>python3`: what the node binaries run on there.
#: python3 is /usr/bin/python3 (the binaries' interpreter): X.Y from the name it links to
#: (python3.11), asked of it only when the name does not say; "" when there is none.
PLATFORM_PROBE = r"""py=$(readlink -f /usr/bin/python3 2>/dev/null || true); py=${py##*/python}
case "$py" in
  [0-9]*.[0-9]*) ;;
  *) py=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' \
       2>/dev/null || true) ;;
esac
libc=$(getconf GNU_LIBC_VERSION 2>/dev/null || true)
case "$libc" in glibc\ *) libc=${libc#glibc } ;; *) libc= ;; esac
printf 'platform\t%s\t%s\t%s\n' "$(uname -m)" "$libc" "$py"
"""
PLATFORM_TAG = "platform"


def platform_script() -> str:
    """The probe alone (preflight)."""
    return f"set -u\necho {MARKER}\n{PLATFORM_PROBE}"


def parse_platform(line: str) -> NodePlatform | None:
    """The probe's line, or None when `line` is not one."""
    fields = line.split("\t")
    if len(fields) != 4 or fields[0] != PLATFORM_TAG:
        return None
    return NodePlatform(arch=fields[1], glibc=fields[2], python=fields[3])


def staging_path(binary: BuiltBinary) -> str:
    """Where a new binary is put before its rename: next to it, so the rename is atomic."""
    directory, _, name = binary.install_path.rpartition("/")
    return f"{directory}/.{name}.apull-new"


def state_script(binaries: Iterable[BuiltBinary], with_previous: bool = False) -> str:
    """The platform probe's line, then per binary (one artefact of each name):
    `name<TAB>sha256 of installed<TAB>sha256 of previous<TAB>service state`.

    The previous binary is hashed only `with_previous` (a rollback); otherwise it reads `-`.
    """
    lines = [
        "set -u",
        'sum() { if [ -f "$1" ]; then sha256sum "$1" | cut -d" " -f1; else echo -; fi; }',
        'unit() { systemctl is-active "$1" 2>/dev/null || true; }',
        f"echo {MARKER}",
        PLATFORM_PROBE.rstrip("\n"),
    ]
    for b in binaries:
        installed = f'"$(sum {shlex.quote(b.install_path)})"'
        previous = f'"$(sum {shlex.quote(b.previous_path)})"' if with_previous else "-"
        service = f'"$(unit {shlex.quote(b.service)})"'
        lines.append(
            f"printf '%s\\t%s\\t%s\\t%s\\n' {shlex.quote(b.name)} {installed} {previous} {service}"
        )
    return "\n".join(lines) + "\n"


def install_script(binary: BuiltBinary, uploaded: str) -> str:
    """Verify the upload, keep the installed binary as previous, rename the new one in."""
    q = shlex.quote
    staging = staging_path(binary)
    return f"""set -eu
echo {MARKER}
up={q(uploaded)}; new={q(staging)}; dst={q(binary.install_path)}; prev={q(binary.previous_path)}
got=$(sha256sum "$up" | cut -d" " -f1)
if [ "$got" != {q(binary.sha256)} ]; then
  rm -f "$up"; echo "{binary.name}: upload corrupted (sha256 $got)" >&2; exit 1
fi
if [ "$up" != "$new" ]; then cp "$up" "$new"; rm -f "$up"; fi
chown 0:0 "$new"; chmod {binary.mode} "$new"
install -d -m 0700 {q(binary.previous_dir)}
if [ -f "$dst" ]; then cp -p "$dst" "$prev.tmp"; mv -f "$prev.tmp" "$prev"; fi
mv -f "$new" "$dst"
echo installed
"""


def rollback_script(binary: BuiltBinary) -> str:
    """Swap the installed and the previous binary (a second rollback rolls forward)."""
    q = shlex.quote
    staging = staging_path(binary)
    return f"""set -eu
echo {MARKER}
new={q(staging)}; dst={q(binary.install_path)}; prev={q(binary.previous_path)}
if [ ! -f "$prev" ]; then echo "{binary.name}: no previous version kept" >&2; exit 3; fi
cp -p "$prev" "$new"
if [ -f "$dst" ]; then cp -p "$dst" "$prev.tmp"; fi
mv -f "$new" "$dst"
if [ -f "$prev.tmp" ]; then mv -f "$prev.tmp" "$prev"; fi
echo rolled-back
"""


def restart_script(services: Iterable[str]) -> str:
    """Restart the given services that are running; say which were restarted."""
    lines = ["set -u", f"echo {MARKER}"]
    for service in services:
        s = shlex.quote(service)
        lines.append(
            f"if systemctl is-active --quiet {s}; then systemctl restart {s} && echo {s}; fi"
        )
    return "\n".join(lines) + "\n"


def after_marker(output: str) -> list[str]:
    """The script's own lines (what it printed after MARKER)."""
    lines = output.splitlines()
    if MARKER in lines:
        lines = lines[lines.index(MARKER) + 1 :]
    return [line for line in lines if line.strip()]
