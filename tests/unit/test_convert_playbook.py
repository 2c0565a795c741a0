"""playbooks/convert.yml (role convert, action apull.deploy.image_convert) with the real
ansible-playbook against a real registry: --check --diff names the images it would convert
and pushes nothing, a run converts and shows each image's progress and figures, a second run
is ok (changed=0), and a bad list is refused by the role's argument specs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from apull_node.image import format as fmt

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="converting needs root")


def playbook(tmp_path: Path, images: object, *flags: str) -> subprocess.CompletedProcess[str]:
    extra = tmp_path / "images.json"
    settings = {"convert_source_insecure": True, "convert_target_insecure": True,
                "convert_chunk_size": "256K"}  # fmt: skip
    extra.write_text(json.dumps({"convert_images": images, **settings}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
           "APULL_REPORT_DIR": str(tmp_path / "reports")}  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i",
           str(ROOT / "inventory/apull_inventory.py"), str(ROOT / "playbooks/convert.yml"),
           "-e", f"@{extra}", *flags]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def recap(out: str) -> dict[str, int]:
    line = re.search(r"^localhost\s+:(.*)$", out, re.M)
    assert line, out[-2000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.group(1))}


def test_convert_playbook_is_idempotent_and_check_mode_tells_the_truth(
    registry, busybox_ref, tmp_path
):
    second = f"{registry.address}/pb/second:v1"
    config, layer = _busybox_blobs()
    registry.push_image("pb/second", "v1", config, [layer])
    images = [
        {"source": busybox_ref, "target": f"{registry.address}/pb/busybox:apull"},
        {"source": second, "target": f"{registry.address}/pb/second:apull"},
    ]

    check = playbook(tmp_path, images, "--check", "--diff")
    assert check.returncode == 0, check.stdout[-3000:]
    assert recap(check.stdout)["changed"] == 1
    for image in images:
        assert f"+{image['target']}: conversion of sha256:" in check.stdout
        assert f"-{image['target']}: absent" in check.stdout
    assert registry.manifest_digest("pb/busybox", "apull") is None  # check mode pushed nothing
    assert registry.manifest_digest("pb/second", "apull") is None

    run = playbook(tmp_path, images)
    assert run.returncode == 0, run.stdout[-3000:]
    assert recap(run.stdout)["changed"] == 1
    out = run.stdout
    # progress per image, as it happens: the layer line, then the figures
    for image in images:
        label = f"[{image['source']} -> {image['target']}]"
        assert re.search(re.escape(label) + r" .*layer 1/1 .* -> EROFS .*uploaded", out), out
        assert re.search(rf"converted {re.escape(image['source'])} -> "
                         rf"{re.escape(image['target'])} in [\d.]+s: 1 layers, "
                         r"[\d.]+ KiB -> [\d.]+ MiB \(1 uploaded\)", out), out  # fmt: skip
    manifest = registry.manifest("pb/busybox", "apull")
    assert manifest["layers"][0]["annotations"][fmt.LAYER_CHUNK_SIZE] == str(256 << 10)
    report = json.loads((tmp_path / "reports/convert-last.json").read_text())
    [row] = report["conversions"][:1]
    assert row["status"] == "converted" and row["layers"] == 1

    again = playbook(tmp_path, images)
    assert again.returncode == 0, again.stdout[-3000:]
    assert recap(again.stdout)["changed"] == 0
    assert again.stdout.count(": current (made from source manifest") == 2
    assert "layer 1/1" not in again.stdout  # nothing downloaded or built

    recheck = playbook(tmp_path, images, "--check", "--diff")
    assert recap(recheck.stdout)["changed"] == 0
    assert "conversion of" not in recheck.stdout


def test_bad_image_lists_are_refused(registry, tmp_path):
    missing = playbook(tmp_path, [{"source": f"{registry.address}/a/b:1"}])
    assert missing.returncode != 0
    assert "target" in missing.stdout and "convert_images" in missing.stdout
    empty = playbook(tmp_path, [])
    assert empty.returncode != 0
    assert "convert_images is empty" in empty.stdout
    failing = playbook(tmp_path, [{"source": f"{registry.address}/no/such:1",
                                   "target": f"{registry.address}/no/such:apull"}])  # fmt: skip
    assert failing.returncode != 0
    assert "read manifest" in failing.stdout and "404" in failing.stdout


def _busybox_blobs():
    from apull.lab import test_image

    return test_image.build()
