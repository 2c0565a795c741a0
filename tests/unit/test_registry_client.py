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

from apull.lab import test_image
from apull.registry.client import OCI_MANIFEST, RegistryClient, RegistryError


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
