# Copyright: apull-deploy contributors
# Apache License 2.0
"""Byte counts as people read them, for the controller-side plugins' output."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


def size_text(size):
    """'512 B', '1.5 KiB', ... '3.2 GiB' (GiB is the largest unit); None counts as 0."""
    value = float(size or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return "%d %s" % (value, unit) if unit == "B" else "%.1f %s" % (value, unit)
        value /= 1024
    return "%d B" % size
