"""Logging for the node services: one line per event to stderr (journald adds the time)."""

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
