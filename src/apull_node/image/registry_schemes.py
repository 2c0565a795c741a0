"""What a registry allowed plain HTTP speaks, learned once (and kept across restarts).

The registry session tries HTTPS first with registries that may speak plain HTTP (apulld's
`registry_insecure` and loopback ones, the converter's --insecure) and falls back to HTTP
(registry_session.py). apulld keeps the answer in a small JSON file in its state directory,
so a restarted apulld does not probe again at the head of the next pull; the converter keeps
it in memory. A connection error with a remembered scheme forgets it: the next try asks
again.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from apull_node.service.files import replace_file

log = logging.getLogger("apull.registry")
SCHEMES = ("http", "https")


class SchemeMemory:
    """host[:port] -> "http" | "https"; in memory only when `path` is None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._schemes = self._load()

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring %s: %s", self.path, err)
            return {}
        if not isinstance(document, dict):
            log.warning("ignoring %s: not a JSON object", self.path)
            return {}
        return {h: s for h, s in document.items() if isinstance(h, str) and s in SCHEMES}

    def get(self, host: str) -> str | None:
        with self._lock:
            return self._schemes.get(host)

    def learned(self, host: str, scheme: str) -> None:
        with self._lock:
            if self._schemes.get(host) == scheme:
                return
            self._schemes[host] = scheme
            self._save()

    def forget(self, host: str, scheme: str) -> None:
        """Forget `scheme` for `host` (a request with it failed); another one is left."""
        with self._lock:
            if self._schemes.get(host) != scheme:
                return
            del self._schemes[host]
            self._save()

    def _save(self) -> None:
        """Write the file (lock held); a failure is only logged: the scheme is probed again."""
        if self.path is None:
            return
        text = json.dumps(self._schemes, indent=1, sort_keys=True) + "\n"
        try:
            replace_file(self.path, text.encode())
        except OSError as err:
            log.warning("cannot keep registry schemes in %s: %s", self.path, err)
