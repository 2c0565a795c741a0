"""The converge converted the lab's test image into the apull format; the idempotence and
check steps converted nothing more (the report of the last run says current)."""

import hashlib
import json
import os
import urllib.request
from pathlib import Path

testinfra_hosts = ["ansible://localhost"]
REGISTRY = f"http://127.0.0.1:{os.environ.get('APULL_LAB_REGISTRY_PORT', '5000')}/v2/lab/busybox"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def ephemeral(name: str) -> Path:
    return Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / name


def get(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.read()


def test_target_is_an_apull_image_of_the_source() -> None:
    tag = ephemeral("target_tag").read_text().strip()
    manifest = json.loads(get(f"{REGISTRY}/manifests/{tag}"))
    notes = manifest["annotations"]
    assert notes["io.apull_node.image.format-version"] == "2"
    source = get(f"{REGISTRY}/manifests/latest")
    assert notes["io.apull.image.source-manifest"] == "sha256:" + hashlib.sha256(source).hexdigest()
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.apull.erofs.v1"
    assert layer["annotations"]["containerd.io/snapshot/apull.chunk-size"] == str(256 << 10)


def test_last_run_found_it_current() -> None:
    report = json.loads(ephemeral("reports/converge-last.json").read_text())
    [conversion] = report["conversions"]
    assert conversion["status"] == "current"
    assert conversion["layers_uploaded"] == 0
