#!/usr/bin/env python3
"""Ansible inventory script: the nodes described by config.txt.

Usage: apull_inventory.py --list | --host HOST

The config file is $APULL_CONFIG, else config.txt at the top of the repository. Runs with
any python3 (standard library only); the apull package is taken from <repo>/src.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from apull.config import ConfigError, format_problems, load_config  # noqa: E402
from apull.inventory import build_inventory  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ansible inventory from apull's config.txt")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the whole inventory")
    mode.add_argument("--host", metavar="HOST", help="print one host's vars (always {})")
    args = parser.parse_args(argv)
    if args.host is not None:
        print("{}")  # hostvars are all in --list's _meta
        return 0

    path = Path(os.environ.get("APULL_CONFIG") or REPO / "config.txt")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(format_problems(e), file=sys.stderr)
        return 1
    # `apull run` has shown the warnings already; Ansible would repeat them as [ERROR] lines.
    if not os.environ.get("APULL_WARNINGS_SHOWN"):
        for warning in cfg.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    json.dump(build_inventory(cfg), sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
