"""Every module of the collection documents itself in a form ansible-doc reads: a colon
followed by a space inside a description once made ansible-doc refuse two of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = ROOT / "collections/ansible_collections/apull/deploy/plugins/modules"


def test_ansible_doc_reads_every_module() -> None:
    names = sorted(f"apull.deploy.{p.stem}" for p in MODULES.glob("*.py"))
    assert len(names) >= 11
    doc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-doc")), "--json", *names],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert doc.returncode == 0, doc.stderr[-2000:]
    found = json.loads(doc.stdout)
    assert sorted(found) == names
    for name, entry in found.items():
        options = entry["doc"].get("options") or {}
        assert entry["doc"]["short_description"], name
        assert all(o.get("description") for o in options.values()), name
        assert entry.get("return") is not None or name.endswith("_facts"), name
