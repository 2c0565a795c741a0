"""Logging for the node services: one line per event to stderr (journald adds the time).

One naming scheme for every logger: `<service>.<part>`, the service as its unit calls it and
the part of it that speaks - `apulld.fetch`, `apulld.fscache`, `apull-snapshotter.remote`,
`apull-snapshotter.overlay` - so `journalctl -u apulld | grep apulld.fetch` finds one part.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(service: str, level: str) -> logging.Logger:
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_journald:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=fmt, force=True)
    return logging.getLogger(service)
