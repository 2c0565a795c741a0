"""The registry client against a real registry v2 server (Debian's docker-registry)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import urllib.request

import pytest
from conftest import free_port

from apull.image.registry_read import resolve_image
from apull.lab import test_image
from apull.registry.client import OCI_MANIFEST, RegistryClient, RegistryError
from apull_node.image.oci import parse_platform
from apull_node.image.registry_session import RegistrySession


def test_test_image_is_reproducible():
    config_a, layer_a = test_image.build()
    config_b, layer_b = test_image.build()
    assert (config_a.digest, layer_a.digest) == (config_b.digest, layer_b.digest)


def test_test_image_layer_matches_its_config():
    config, layer = test_image.build()
    tar_bytes = gzip.decompress(layer.data)
    diff_id = json.loads(config.data)["rootfs"]["diff_ids"][0]
    assert diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert names["bin/busybox"].isfile() and names["bin/busybox"].mode == 0o755
    assert names["bin/echo"].issym() and names["bin/echo"].linkname == "busybox"


def test_push_image_then_read_it_back(registry):
    digest = test_image.push(registry)
    assert registry.manifest_digest(test_image.REPO, test_image.TAG) == digest
    url = f"http://{registry.address}/v2/{test_image.REPO}/manifests/{digest}"
    req = urllib.request.Request(url, headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(req) as resp:
        manifest = json.loads(resp.read())
    config, layer = test_image.build()
    assert manifest["layers"][0]["digest"] == layer.digest
    assert manifest["config"]["digest"] == config.digest
    for blob in (config, layer):
        with urllib.request.urlopen(
            f"http://{registry.address}/v2/{test_image.REPO}/blobs/{blob.digest}"
        ) as resp:
            assert resp.read() == blob.data


def test_second_push_uploads_nothing_and_keeps_the_digest(registry):
    first = test_image.push(registry)
    _, layer = test_image.build()
    assert registry.has_blob(test_image.REPO, layer.digest)
    assert test_image.push(registry) == first


def test_unknown_manifest_and_unreachable_registry(registry):
    assert registry.manifest_digest("lab/none", "latest") is None
    dead = RegistryClient(f"127.0.0.1:{free_port()}", timeout=2)
    assert dead.ping() is False
    with pytest.raises(RegistryError, match=r"127\.0\.0\.1"):
        dead.has_blob("x/y", "sha256:00")


def test_a_push_for_two_arches_is_an_index_that_resolves_per_platform(
    registry, tmp_path, monkeypatch
):
    """With arm64 lab nodes, lab/busybox:latest is an OCI index; each platform resolves to
    its own manifest, whose config names that architecture. The arm64 busybox comes from the
    lab's arm64 root: here a stand-in file (its bytes are only packed, never run)."""
    monkeypatch.setenv("APULL_LAB_CACHE", str(tmp_path))
    arm_busybox = test_image.busybox("arm64")
    arm_busybox.parent.mkdir(parents=True)
    arm_busybox.write_bytes(b"\x7fELF stand-in for the arm64 busybox\n")
    digest = test_image.push(registry, ("amd64", "arm64"))
    session = RegistrySession(registry.address, test_image.REPO, insecure=True)
    for arch in ("amd64", "arm64"):
        manifest, top = resolve_image(session, test_image.TAG, parse_platform(f"linux/{arch}"))
        assert top == digest
        config, layer = test_image.build(arch)
        assert (manifest.config.digest, manifest.layers[0].digest) == (config.digest, layer.digest)
        assert json.loads(config.data)["architecture"] == arch
    assert test_image.push(registry, ("amd64", "arm64")) == digest  # reproducible
    arm_busybox.unlink()
    with pytest.raises(FileNotFoundError, match="arm64 lab image"):
        test_image.build("arm64")
