"""PUT/GET /v1.0/apulld/warm on the file backend against a real registry (behind the
counting proxy): the start-up set first, then whole; progress read from the chunk cache;
a rerun fetches nothing; a blocked registry fails the job naming the layer and the reason;
bad requests are refused naming the field."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from serving_support import MULTI_REPO, Apulld, Layer, Proxy

from apull.image.registry_read import fetch_manifest
from apull.lab import test_image
from apull.registry.client import RegistryClient
from apull_node.daemon.backend import NodePaths, probe_file

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="FUSE needs root"),
    pytest.mark.skipif(not probe_file(NodePaths())[0], reason="no file-backed EROFS here"),
]
WARM = "/v1.0/apulld/warm"


def body(proxy: Proxy, registry: RegistryClient, repo: str, **extra: Any) -> dict[str, Any]:
    manifest = registry.manifest_digest(repo, "apull")
    assert manifest is not None
    return {"registry": proxy.address, "repo": repo, "manifest": manifest, **extra}


def wait_done(apulld: Apulld, manifest: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        status, answer = apulld.request("GET", f"{WARM}?manifest={manifest}")
        assert status == 200, answer
        (image,) = answer["images"]
        if image["state"] != "warming":
            return image
        assert time.monotonic() < deadline, image
        time.sleep(0.05)


def test_the_start_up_set_then_the_whole_image_then_nothing(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    multi = images["multi"]
    chunk = multi.chunk_size
    assert multi.size > 4 * chunk
    # The start-up set: a few bytes in the second chunk and a range across chunks 4 and 5.
    startup = {multi.digest: [[chunk + 10, 100], [4 * chunk - 1, 2]]}
    apulld = Apulld(tmp_path)
    try:
        apulld.start()
        asked = body(proxy, registry, MULTI_REPO, whole=False, startup=startup)
        status, answer = apulld.request("PUT", WARM, asked)
        assert (status, answer["started"]) == (202, True)
        image = wait_done(apulld, asked["manifest"])
        assert (image["state"], image["error"]) == ("warm", "")
        assert image["startup_bytes"] == image["startup_cached"] == 3 * chunk
        assert image["cached"] == 3 * chunk < image["bytes"] == multi.size
        ranges = [r[1] for r in proxy.state.requests if r[0] == multi.digest]
        assert sorted(ranges) == sorted(
            [f"bytes={chunk}-{2 * chunk - 1}", f"bytes={3 * chunk}-{5 * chunk - 1}"]
        )

        asked["whole"] = True
        status, answer = apulld.request("PUT", WARM, asked)
        assert (status, answer["started"]) == (202, True)
        image = wait_done(apulld, asked["manifest"])
        assert image["state"] == "warm"
        assert image["cached"] == image["bytes"] == multi.size
        assert image["layers"] == [{"digest": multi.digest, "size": multi.size,
                                    "cached": multi.size}]  # fmt: skip
        # Each byte of the layer came from the registry once.
        assert proxy.bytes_of(multi.digest) == multi.size

        # A rerun asks the registry for nothing, and a container reads without it.
        requests = len(proxy.state.requests)
        apulld.request("PUT", WARM, asked)
        image = wait_done(apulld, asked["manifest"])
        assert (image["state"], image["fetched"]) == ("warm", 0)
        with open(apulld.put(multi, proxy.address), "rb") as stream:
            data = stream.read()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == multi.digest
        assert len(proxy.state.requests) == requests
    finally:
        apulld.close()


def test_a_blocked_registry_fails_the_job_naming_the_layer(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    busybox = images["busybox"]
    apulld = Apulld(tmp_path, {"fetch_retries": 0})
    try:
        apulld.start()
        asked = body(proxy, registry, test_image.REPO)
        proxy.down()
        apulld.request("PUT", WARM, {**asked})
        image = wait_done(apulld, asked["manifest"])
        assert image["state"] == "failed"
        assert image["error"].startswith("manifest: ")
        assert proxy.address in image["error"]

        # The manifest given, the layer's registry down: the layer is named.
        raw = fetch_manifest(registry.session(test_image.REPO), asked["manifest"])[0]
        asked["manifest_data"] = base64.b64encode(raw).decode()
        apulld.request("PUT", WARM, asked)
        image = wait_done(apulld, asked["manifest"])
        assert image["state"] == "failed"
        assert f"layer {busybox.digest}: " in image["error"]
        assert image["cached"] == 0
    finally:
        apulld.close()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"whole": "yes"}, "whole"),
        ({"startup": []}, "startup"),
        ({"startup": {"sha256:00": [[0, 1]]}}, "startup"),
        ({"startup": {"sha256:" + "a" * 64: [[0, 0]]}}, "startup.sha256:"),
        ({"startup": {"sha256:" + "a" * 64: [[-1, 4]]}}, "startup.sha256:"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_warm_requests_name_the_field(
    apulld: Apulld, extra: dict[str, Any], field: str
) -> None:
    apulld.start()
    asked = {"registry": "r.example", "repo": "a/b", "manifest": "sha256:" + "b" * 64, **extra}
    status, answer = apulld.request("PUT", WARM, asked)
    assert status == 400
    assert answer["error"].startswith(field)


def test_an_index_is_resolved_to_this_nodes_platform_and_a_plain_image_needs_nothing(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    multi = images["multi"]
    converted = body(proxy, registry, MULTI_REPO)
    raw = fetch_manifest(registry.session(MULTI_REPO), converted["manifest"])[0]
    index = registry.push_index(MULTI_REPO, "apull-index", [("arm64", b"{}"), ("amd64", raw)])
    plain = test_image.push(registry)
    apulld = Apulld(tmp_path)
    try:
        apulld.start()
        apulld.request("PUT", WARM, {**converted, "manifest": index, "whole": False,
                                     "startup": {multi.digest: [[0, 1]]}})  # fmt: skip
        image = wait_done(apulld, index)
        assert (image["state"], image["lazy"], image["error"]) == ("warm", True, "")
        assert image["startup_cached"] == multi.chunk_size == image["cached"]

        asked = {"registry": proxy.address, "repo": test_image.REPO, "manifest": plain}
        apulld.request("PUT", WARM, asked)
        image = wait_done(apulld, plain)
        assert (image["state"], image["lazy"], image["bytes"]) == ("warm", False, 0)
    finally:
        apulld.close()


def test_a_cold_starts_reads_are_the_start_up_set_another_node_warms(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    multi = images["multi"]
    chunk = multi.chunk_size
    first = Apulld(tmp_path / "first")
    first.root.mkdir()
    try:
        first.start()
        with open(first.put(multi, proxy.address), "rb") as stream:
            stream.seek(2 * chunk + 100)
            stream.read(50)
        status, recorded = first.request("GET", "/v1.0/apulld/startup")
        assert status == 200
        ((digest, ranges),) = recorded["layers"].items()
        assert digest == multi.digest
        assert all(o <= 2 * chunk + 100 and 2 * chunk + 150 <= o + n for o, n in ranges)
        assert sum(n for _, n in ranges) < chunk
    finally:
        first.close()
    second = Apulld(tmp_path / "second")
    second.root.mkdir()
    try:
        second.start()
        asked = body(proxy, registry, MULTI_REPO, whole=False, startup=recorded["layers"])
        second.request("PUT", WARM, asked)
        image = wait_done(second, asked["manifest"])
        assert image["state"] == "warm"
        assert image["startup_cached"] == image["startup_bytes"] == image["cached"] == chunk
    finally:
        second.close()


def test_an_image_never_prewarmed_is_surveyed_and_the_cache_limit_is_no_secret(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    multi = images["multi"]
    apulld = Apulld(tmp_path, {"cache_size_limit_mb": 1})
    try:
        apulld.start()
        asked = body(proxy, registry, MULTI_REPO)
        query = f"manifest={asked['manifest']}&registry={proxy.address}&repo={MULTI_REPO}"
        status, answer = apulld.request("GET", f"{WARM}?{query}")
        assert status == 200, answer
        (survey,) = answer["images"]
        assert (survey["state"], survey["lazy"], survey["cached"]) == ("", True, 0)
        assert survey["bytes"] == multi.size and survey["fetched"] == 0
        assert proxy.bytes_of(multi.digest) == 0  # surveyed, nothing fetched
        # Whole, into a cache of 1 MiB: the job says the cache cannot hold it.
        apulld.request("PUT", WARM, asked)
        image = wait_done(apulld, asked["manifest"])
        assert image["state"] == "failed", image
        assert "its limit is smaller than what it was asked to hold" in image["error"]
        assert image["cached"] < image["bytes"]
    finally:
        apulld.close()


def test_the_start_up_set_of_one_image_is_its_layers_reads_only(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    multi, busybox = images["multi"], images["busybox"]
    apulld = Apulld(tmp_path)
    try:
        apulld.start()
        for layer in (multi, busybox):
            with open(apulld.put(layer, proxy.address), "rb") as stream:
                stream.read(100)
        _, every = apulld.request("GET", "/v1.0/apulld/startup")
        assert set(every["layers"]) == {multi.digest, busybox.digest}
        asked = body(proxy, registry, MULTI_REPO)
        query = f"manifest={asked['manifest']}&registry={proxy.address}&repo={MULTI_REPO}"
        _, one = apulld.request("GET", f"/v1.0/apulld/startup?{query}")
        assert set(one["layers"]) == {multi.digest}
    finally:
        apulld.close()
