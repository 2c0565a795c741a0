"""One read of a node's apull stack, printed as JSON: what `apull status` shows.

The controller sends this file's text to the node's /usr/bin/python3 (3.9 or newer) and runs
it as root; it imports nothing but the standard library, plus the settings reader carried by
the installed apulld (a zipapp), so that it reads /etc/apull/config.toml exactly as the
services do. It changes nothing: every file is opened read-only, the snapshotter's SQLite
database in read-only mode, and the only commands are `systemctl show`, `ctr plugins ls`
and `journalctl`.

Argument: one JSON object, {"binaries": [install paths], "services": [unit names],
"snapshotter": plugin name, "errors_since": journalctl --since value}.
Output: MARKER on a line, then one JSON object (see docs/status.md for its fields).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MARKER = "--apull-status--"
PROBE_VERSION = 1
SETTINGS_PATH = "/etc/apull/config.toml"
APULLD_PATH = "/usr/bin/apulld"
FS_CTL_PARAMS = "/sys/module/fs_ctl/parameters"
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
#: Written by the containerd role after each patch: the file's sha256 and the patch's arguments.
PATCH_RECORD = CONTAINERD_CONFIG + ".apull-patch.json"
PING_PATH = "/v1.0/apulld/ping"
BLOB_ID_LABEL = "containerd.io/snapshot/apull-remote.blob-id"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
MAX_CONFIG_BYTES = 1 << 20
MAX_ERRORS = 10
COMMAND_TIMEOUT_S = 10
#: The present bitmap's header (chunk_state.py): magic, version, chunk size, blob size, count.
_BITMAP_MAGIC = b"APULLCC\0"
_BITMAP_HEADER = 32

Json = dict[str, Any]


def _run(*argv: str) -> tuple[int, str]:
    """(exit status, stdout and stderr); 127 when the command does not exist."""
    try:
        done = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT_S,
            check=False,
        )  # fmt: skip
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]}: no answer in {COMMAND_TIMEOUT_S} s"
    return done.returncode, done.stdout.decode("utf-8", "replace")


def _read(path: str, limit: int = 4096) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def sha256_of(path: str) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def os_release() -> str:
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


def _glibc() -> str:
    try:
        found = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return ""
    return found.split()[-1] if found.startswith("glibc ") else ""


def host_facts() -> Json:
    uptime = _read("/proc/uptime") or "0"
    return {
        "hostname": socket.gethostname(),
        "os": os_release(),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "python": "{}.{}".format(*sys.version_info[:2]),
        "glibc": _glibc(),
        "uptime_s": float(uptime.split()[0]),
        "boot_id": (_read("/proc/sys/kernel/random/boot_id") or "").strip(),
    }


def fs_ctl(base: str = FS_CTL_PARAMS) -> dict[str, str] | None:
    """The gate's parameters and their values; None where the kernel has no gate."""
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return None
    return {name: (_read(os.path.join(base, name)) or "").strip() for name in names}


def read_settings(path: str = SETTINGS_PATH, apulld: str = APULLD_PATH) -> Json:
    """The node services' settings, through the settings reader the installed apulld carries;
    the defaults, said so, when there is no file or no apulld to read it with."""
    found: Json = {
        "source": "defaults",
        "cache_dir": "/var/lib/containerd-apull/cachefiles",
        "cache_size_limit_mb": 10240,
        "apulld_address": "/run/apulld.sock",
        "snapshotter_root": "/var/lib/containerd-apull",
        "snapshotter_address": "/run/containerd-apull-grpc.sock",
        "containerd_address": "/run/containerd/containerd.sock",
        "metrics": {},
    }
    if not os.path.exists(path):
        found["source"] = f"defaults ({path} is missing)"
        return found
    if apulld not in sys.path:
        sys.path.insert(0, apulld)
    try:
        from apull_node.service.settings import load_settings

        settings = load_settings(Path(path))
    except Exception as err:  # an old apulld, or a file the services refuse too
        found["source"] = f"defaults ({path} unreadable: {type(err).__name__}: {err})"
        found["error"] = f"{type(err).__name__}: {err}"
        return found
    found.update(
        source=path,
        cache_dir=settings.apulld.cache_dir,
        cache_size_limit_mb=settings.apulld.cache_size_limit_mb,
        apulld_address=settings.apulld.address,
        snapshotter_root=settings.snapshotter.root,
        snapshotter_address=settings.snapshotter.address,
        containerd_address=settings.snapshotter.containerd_address,
    )
    for section in ("apulld", "snapshotter"):
        address = getattr(getattr(settings, section), "metrics_address", "")
        if address:
            found["metrics"][section] = address
    return found


def services(names: list[str]) -> Json:
    """Per unit: its state, and since when (seconds since the epoch, from the monotonic
    clock: the same on systemd 247 and later) and how often it was restarted."""
    uptime = float((_read("/proc/uptime") or "0").split()[0])
    booted = time.time() - uptime
    found: Json = {}
    for name in names:
        status, out = _run(
            "systemctl", "show", name, "--property=ActiveState,SubState,LoadState,"
            "ActiveEnterTimestampMonotonic,NRestarts,MainPID",
        )  # fmt: skip
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        entered = int(values.get("ActiveEnterTimestampMonotonic") or 0)
        found[name] = {
            "active": values.get("ActiveState", "unknown" if status else ""),
            "sub": values.get("SubState", ""),
            "loaded": values.get("LoadState", ""),
            "since": round(booted + entered / 1e6, 1) if entered else None,
            "restarts": int(values["NRestarts"]) if values.get("NRestarts", "").isdigit() else None,
            "pid": int(values.get("MainPID") or 0),
        }
    return found


def apulld_ping(address: str) -> Json:
    """apulld's own answer (backend and why, version), or why there is none."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(address)
            s.sendall(f"GET {PING_PATH} HTTP/1.0\r\nHost: apulld\r\n\r\n".encode())
            raw = b""
            while True:
                piece = s.recv(65536)
                if not piece:
                    break
                raw += piece
    except OSError as err:
        return {"error": f"{address}: {err.strerror or err}"}
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200 " not in status_line + " ":
        return {"error": f"{address}: {status_line or 'no answer'}"}
    try:
        answer = json.loads(body)
    except ValueError:
        return {"error": f"{address}: not JSON"}
    return {"answer": answer}


def containerd_plugin(address: str, name: str) -> Json:
    """The snapshotter's row in `ctr plugins ls`: its status (ok, error, skip) or why none."""
    status, out = _run("ctr", "--address", address, "--connect-timeout", "3s", "plugins", "ls")
    if status:
        return {"status": None, "error": out.strip()[-300:] or f"ctr exit {status}"}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 3 and cells[0].endswith(".snapshotter.v1") and cells[1] == name:
            return {"status": cells[-1], "error": ""}
    return {"status": None, "error": f"no snapshotter plugin {name!r} in ctr plugins ls"}


def containerd_config(path: str = CONTAINERD_CONFIG, record: str = PATCH_RECORD) -> Json:
    raw: bytes | None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        raw = None
    recorded = _read(record, 65536)
    try:
        patch = json.loads(recorded) if recorded else None
    except ValueError:
        patch = None
    return {
        "path": path,
        "text": raw.decode("utf-8", "replace") if raw and len(raw) <= MAX_CONFIG_BYTES else None,
        "sha256": hashlib.sha256(raw).hexdigest() if raw is not None else None,
        "record": patch if isinstance(patch, dict) else None,
    }


def _walk_cache(cache_dir: str) -> tuple[int, dict[str, int]]:
    """One walk of the cache dir: bytes allocated under it (sparse files count what they
    hold, not their size), and the kernel's cache files (under cache/, named D<cookie key>,
    the blob id) with the bytes allocated in each."""
    total, kernel_files = 0, {}
    kernel_root = os.path.join(cache_dir, "cache")
    for directory, _, files in os.walk(cache_dir):
        in_kernel_cache = directory.startswith(kernel_root)
        for name in files:
            try:
                held = os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                continue
            total += held
            if in_kernel_cache and name.startswith("D"):
                kernel_files[name[1:]] = held
    return total, kernel_files


def _bitmap_bytes(present: str) -> tuple[int, int] | None:
    """(blob size, bytes of it held) from a file-backend chunk bitmap, or None."""
    try:
        with open(present, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if len(raw) < _BITMAP_HEADER or raw[:8] != _BITMAP_MAGIC:
        return None
    chunk = int.from_bytes(raw[12:16], "little")
    size = int.from_bytes(raw[16:24], "little")
    count = int.from_bytes(raw[24:32], "little")
    bits = raw[_BITMAP_HEADER:]
    held = 0
    for index in range(count):
        if index >> 3 < len(bits) and bits[index >> 3] & (1 << (index & 7)):
            held += min(chunk, size - index * chunk)
    return size, held


def _image_refs(snapshotter_root: str) -> dict[str, set[str]]:
    """blob id -> the images (CRI's image-ref label) whose layers use it."""
    db = os.path.join(snapshotter_root, "metadata.db")
    if not os.path.exists(db):
        return {}
    refs: dict[str, set[str]] = {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(
                "SELECT b.value, r.value FROM labels b JOIN labels r "
                "ON r.snapshot_id = b.snapshot_id AND r.key = ? WHERE b.key = ?",
                (IMAGE_REF_LABEL, BLOB_ID_LABEL),
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    for blob_id, ref in rows:
        refs.setdefault(blob_id, set()).add(ref)
    return refs


def cache_and_images(
    settings: Json, written: dict[str, int] | None = None
) -> tuple[Json, list[Json]]:
    """The cache's use against its limit, and each image apulld serves with the part of it
    fetched so far (layers grouped by the image CRI pulled them for, else by repository)."""
    cache_dir = settings["cache_dir"]
    state_dir = os.path.join(os.path.dirname(cache_dir.rstrip("/")), "apulld")
    used, kernel_files = _walk_cache(cache_dir)
    cache = {
        "dir": cache_dir,
        "bytes": used,
        "limit_bytes": int(settings["cache_size_limit_mb"]) << 20,
    }
    text = _read(os.path.join(state_dir, "blobs.json"), 16 << 20)
    try:
        document = json.loads(text) if text else {}
    except ValueError:
        document = {}
    blobs = document.get("blobs", []) if isinstance(document, dict) else []
    if isinstance(blobs, dict):
        blobs = list(blobs.values())
    refs = _image_refs(settings["snapshotter_root"])
    images: dict[str, Json] = {}
    for blob in blobs:
        if not isinstance(blob, dict) or "blob_id" not in blob:
            continue
        size = int(blob.get("size") or 0)
        digest = str(blob.get("digest", ""))
        # fscache: the kernel links a cache file in only once its object is closed; what the
        # running apulld wrote into the open ones it reports itself (ping: written_bytes).
        on_disk = kernel_files.get(blob["blob_id"], 0)
        wrote = int((written or {}).get(blob["blob_id"], 0))
        held = min(size, max(on_disk, wrote))
        cache["bytes"] += max(0, wrote - on_disk)  # open objects' files: not in the tree
        chunk = int(blob.get("chunk_size") or 0)
        if chunk:
            algorithm, _, hexdigest = digest.partition(":")
            bitmap = _bitmap_bytes(
                os.path.join(cache_dir, "chunks", f"{algorithm}-{hexdigest}-c{chunk}", "present")
            )
            if bitmap is not None:
                held = max(held, min(size, bitmap[1]))
        names = sorted(refs.get(blob["blob_id"], ())) or [
            f"{blob.get('registry', '')}/{blob.get('repo', '')}"
        ]
        for name in names:
            image = images.setdefault(name, {"image": name, "layers": 0, "bytes": 0, "fetched": 0})
            image["layers"] += 1
            image["bytes"] += size
            image["fetched"] += held
    return cache, sorted(images.values(), key=lambda i: i["image"])


#: A service's warning or error line: the services log `LEVEL logger: message` to stderr,
#: which journald stores at priority info, so the level is read from the text.
_LEVEL = re.compile(r"\]: (WARNING|ERROR|CRITICAL) ")


def warning_lines(lines: list[str]) -> list[str]:
    """The warning and error lines of journal output, newest last, at most MAX_ERRORS."""
    return [line for line in lines if _LEVEL.search(line)][-MAX_ERRORS:]


def recent_errors(units: list[str], since: str) -> list[str]:
    """apulld's and the snapshotter's warnings and errors since `since`, newest last."""
    argv = ["journalctl", "--no-pager", "-q", "-o", "short-iso", "--since", since,
            "-n", "5000"]  # fmt: skip
    for unit in units:
        argv += ["-u", unit]
    status, out = _run(*argv)
    if status:
        return []
    return warning_lines(out.splitlines())


def report(args: Json) -> Json:
    settings = read_settings()
    ping = apulld_ping(settings["apulld_address"])
    serving = (ping.get("answer") or {}).get("serving") or {}
    written = serving.get("written_bytes") if isinstance(serving, dict) else None
    cache, images = cache_and_images(settings, written if isinstance(written, dict) else None)
    return {
        "probe": PROBE_VERSION,
        "host": host_facts(),
        "fs_ctl": fs_ctl(),
        "settings": settings,
        "binaries": {path: sha256_of(path) for path in args.get("binaries", [])},
        "services": services(list(args.get("services", []))),
        "apulld": ping,
        "plugin": containerd_plugin(
            settings["containerd_address"], args.get("snapshotter", "apull")
        ),
        "containerd_config": containerd_config(),
        "cache": cache,
        "images": images,
        "errors": recent_errors(
            [s for s in args.get("services", []) if s != "containerd.service"],
            str(args.get("errors_since", "-1h")),
        ),
    }


def main() -> None:
    args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    document = report(args)
    sys.stdout.write(MARKER + "\n" + json.dumps(document, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
