"""apull-image-build convert --check / --skip-if-current / --json against a real registry:
a target converted from the source as it is now is current (nothing pushed again), and each
way it can stop being current is caught and named."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import urllib.request

import pytest

from apull.image.cli import main
from apull.registry.client import Blob
from apull_node.image import format as fmt
from apull_node.image.oci import OCI_MANIFEST

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="converting needs root")

OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def push_small(registry, repo: str, tag: str, text: bytes) -> str:
    """A one-layer image with one file holding `text`; returns the manifest digest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/greeting")
        info.size, info.mode, info.mtime = len(text), 0o644, 1_600_000_000
        tar.addfile(info, io.BytesIO(text))
    raw = buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}  # fmt: skip
    layer = Blob(OCI_GZIP, gzip.compress(raw, mtime=0))
    return registry.push_image(repo, tag, Blob(OCI_CONFIG, json.dumps(config).encode()), [layer])


def run(capsys, registry, source: str, target: str, *flags: str) -> tuple[dict, str]:
    rc = main(["convert", "--source", f"{registry.address}/{source}", "--target",
               f"{registry.address}/{target}", "--source-insecure", "--target-insecure",
               "--json", *flags])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_check_says_what_would_happen_and_changes_nothing(registry, capsys):
    source = push_small(registry, "cur/app", "v1", b"hello\n")
    got, err = run(capsys, registry, "cur/app:v1", "cur/app:apull", "--check")
    assert got["status"] == "would convert" and got["reason"] == "the target does not exist"
    assert got["source_manifest"] == source and got["target_manifest"] == ""
    assert got["layers"] == 1 and got["source_bytes"] > 0
    assert "would convert: the target does not exist" in err
    assert registry.manifest_digest("cur/app", "apull") is None  # nothing pushed


def test_skip_if_current_converts_once_then_reports_current(registry, capsys):
    push_small(registry, "cur/app", "v2", b"second\n")
    first, _ = run(capsys, registry, "cur/app:v2", "cur/app:v2-apull", "--skip-if-current")
    assert first["status"] == "converted"
    assert first["reason"] == "the target does not exist"
    assert first["layers"] == first["layers_uploaded"] == 1
    assert first["target_bytes"] >= 4096 and first["seconds"] > 0
    pushed = registry.manifest_digest("cur/app", "v2-apull")
    assert first["target_manifest"] == pushed

    again, err = run(capsys, registry, "cur/app:v2", "cur/app:v2-apull", "--skip-if-current")
    assert again["status"] == "current", again
    assert again["target_manifest"] == pushed and again["layers_uploaded"] == 0
    assert again["reason"].startswith(f"made from source manifest {first['source_manifest'][7:19]}")
    assert "layer 1/1" not in err  # nothing downloaded or built
    check, _ = run(capsys, registry, "cur/app:v2", "cur/app:v2-apull", "--check")
    assert check["status"] == "current"


def test_each_way_a_target_stops_being_current_is_named(registry, capsys):
    push_small(registry, "cur/app", "v3", b"before\n")
    run(capsys, registry, "cur/app:v3", "cur/app:v3-apull")

    other_chunk, _ = run(capsys, registry, "cur/app:v3", "cur/app:v3-apull", "--check",
                         "--chunk-size", "64K")  # fmt: skip
    assert other_chunk["status"] == "would convert"
    assert other_chunk["reason"] == "the target's chunk size is not 65536"

    old = registry.manifest_digest("cur/app", "v3")
    new = push_small(registry, "cur/app", "v3", b"after\n")  # the source tag moves on
    moved, _ = run(capsys, registry, "cur/app:v3", "cur/app:v3-apull", "--check")
    assert moved["status"] == "would convert"
    assert moved["reason"] == (
        f"the target was made from {old[7:19]}, the source is now {new[7:19]}"
    )
    redone, _ = run(capsys, registry, "cur/app:v3", "cur/app:v3-apull", "--skip-if-current")
    assert redone["status"] == "converted" and redone["source_manifest"] == new
    assert redone["previous_target_manifest"] == moved["target_manifest"]
    assert redone["target_manifest"] != moved["target_manifest"]

    # A plain image at the target's tag is not a conversion.
    push_small(registry, "cur/plain", "x", b"plain\n")
    push_small(registry, "cur/plain", "y", b"plain\n")
    plain, _ = run(capsys, registry, "cur/plain:x", "cur/plain:y", "--check")
    assert plain["reason"] == "the target is not an apull image"


def test_a_missing_layer_blob_makes_the_target_stale(registry, capsys):
    push_small(registry, "cur/gone", "v1", b"gone\n")
    run(capsys, registry, "cur/gone:v1", "cur/gone:apull")
    manifest = registry.manifest("cur/gone", "apull")
    assert manifest["annotations"][fmt.IMAGE_SOURCE_MANIFEST].startswith("sha256:")
    # Point the tag at a manifest whose chunk table the registry does not have.
    layer = manifest["layers"][0]
    layer["annotations"][fmt.LAYER_CHUNK_TABLE] = "sha256:" + "0" * 64
    body = json.dumps(manifest).encode()
    request = urllib.request.Request(
        f"http://{registry.address}/v2/cur/gone/manifests/apull", data=body, method="PUT",
        headers={"Content-Type": OCI_MANIFEST},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 201
    stale, _ = run(capsys, registry, "cur/gone:v1", "cur/gone:apull", "--check")
    assert stale["status"] == "would convert"
    assert stale["reason"] == "the target's layer 1 chunk table 000000000000 is missing"
