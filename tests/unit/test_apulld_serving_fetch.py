"""apulld's range fetcher against our registry behind a test proxy: ranges, retries with
backoff, errors that name what failed, mirrors before the origin."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from serving_support import Proxy

from apull.registry.client import Blob
from apull.testing.pull_through import PullThroughCache
from apull_node.daemon import apulld_metrics as metrics
from apull_node.daemon import registry_fetch
from apull_node.daemon.counters import Counters
from apull_node.daemon.registry_fetch import (
    BlobLocation,
    FetchError,
    FetchSettings,
    RangeFetcher,
    is_loopback,
)
from apull_node.image.registry_mirrors import Mirror, parse_mirrors

REPO = "test/fetch"
DATA = random.Random(9).randbytes(200_000)
BLOB = Blob("application/octet-stream", DATA)


@pytest.fixture(scope="module")
def pushed(registry) -> str:
    registry.push_blob(REPO, BLOB)
    return BLOB.digest


@pytest.fixture
def proxy(registry) -> Iterator[Proxy]:
    front = Proxy(registry.address)
    yield front
    front.down()


def fetcher(**settings) -> tuple[RangeFetcher, Counters]:
    counters = Counters()
    options = {"retries": 2, "timeout": 5.0, "backoff": 0.01, **settings}
    return RangeFetcher(FetchSettings(**options), counters), counters


def test_ranges_and_whole_blobs(pushed, proxy) -> None:
    fetch, counters = fetcher()
    where = BlobLocation(proxy.address, REPO, pushed)
    assert fetch.fetch(where, 1000, 5000) == (DATA[1000:5000], proxy.address)
    assert fetch.fetch(where, 0, len(DATA))[0] == DATA
    assert fetch.fetch_whole(where) == DATA
    assert counters.get("bytes_fetched") == 4000 + len(DATA)
    assert counters.get("table_bytes_fetched") == len(DATA)
    assert [r[1] for r in proxy.state.requests] == [
        "bytes=1000-4999",
        f"bytes=0-{len(DATA) - 1}",
        "",
    ]


def test_a_plain_http_registry_is_probed_once_across_restarts(pushed, proxy, tmp_path) -> None:
    """HTTPS is tried first (the registry is allowed plain HTTP); what it speaks is kept,
    so a restarted apulld (a new fetcher on the same file) goes straight to HTTP."""
    kept = tmp_path / "registry-schemes.json"
    where = BlobLocation(proxy.address, REPO, pushed)
    assert fetcher(schemes_file=kept)[0].fetch(where, 0, 10)[0] == DATA[:10]
    assert proxy.state.connections == 2  # the TLS attempt, then HTTP
    assert json.loads(kept.read_text()) == {proxy.address: "http"}
    assert fetcher(schemes_file=kept)[0].fetch(where, 0, 10)[0] == DATA[:10]
    assert proxy.state.connections == 3
    # Not kept: every new fetcher probes again.
    assert fetcher()[0].fetch(where, 0, 10)[0] == DATA[:10]
    assert proxy.state.connections == 5


def test_a_pooled_connection_the_registry_closed_keeps_the_scheme(pushed, proxy, tmp_path) -> None:
    kept = tmp_path / "registry-schemes.json"
    fetch, _ = fetcher(schemes_file=kept)
    where = BlobLocation(proxy.address, REPO, pushed)
    assert fetch.fetch(where, 0, 10)[0] == DATA[:10]
    proxy.down()  # closes the kept-alive connection too
    proxy.up()
    assert fetch.fetch(where, 0, 10)[0] == DATA[:10]
    assert proxy.state.connections == 3  # one fresh plain connection, no TLS attempt
    assert json.loads(kept.read_text()) == {proxy.address: "http"}


def test_a_kept_scheme_that_fails_is_probed_again(pushed, proxy, tmp_path) -> None:
    kept = tmp_path / "registry-schemes.json"
    kept.write_text(json.dumps({proxy.address: "https", "other:5000": "gopher"}))
    fetch, counters = fetcher(schemes_file=kept)
    where = BlobLocation(proxy.address, REPO, pushed)
    assert fetch.fetch(where, 0, 10)[0] == DATA[:10]
    assert counters.get("fetch_retries") == 1
    assert json.loads(kept.read_text()) == {proxy.address: "http"}


def test_server_errors_are_retried_with_backoff(pushed, proxy) -> None:
    fetch, counters = fetcher()
    proxy.state.status, proxy.state.status_times = 503, 2
    where = BlobLocation(proxy.address, REPO, pushed)
    assert fetch.fetch(where, 0, 10)[0] == DATA[:10]
    assert counters.get("fetch_retries") == 2 and len(proxy.state.requests) == 3


def test_errors_name_registry_repository_digest_and_range(pushed, proxy) -> None:
    fetch, counters = fetcher()
    proxy.state.status = 503
    where = BlobLocation(proxy.address, REPO, pushed)
    with pytest.raises(FetchError) as caught:
        fetch.fetch(where, 4096, 8192)
    assert str(caught.value) == (
        f"{proxy.address}/{REPO}@{pushed} bytes 4096-8191: failed 3 times; last: "
        f"{proxy.address}: HTTP 503 (UNAVAILABLE: test says no)"
    )
    assert counters.get("fetch_errors") == 1
    # Right after that, one try only: a registry that is down does not stall every read.
    asked = len(proxy.state.requests)
    with pytest.raises(FetchError, match=r"bytes 0-9: failed \(one try: every try failed less"):
        fetch.fetch(where, 0, 10)
    assert len(proxy.state.requests) == asked + 1


def test_unknown_blobs_are_not_retried(proxy) -> None:
    fetch, _ = fetcher()
    where = BlobLocation(proxy.address, REPO, "sha256:" + "0" * 64)
    with pytest.raises(FetchError, match=r"bytes 0-9: not found .*BLOB_UNKNOWN"):
        fetch.fetch(where, 0, 10)
    assert len(proxy.state.requests) == 1


def test_mirrors_go_first_and_a_failing_one_rests(pushed, registry, proxy) -> None:
    mirror = Proxy(registry.address)
    try:
        fetch, counters = fetcher(mirrors=(Mirror(f"http://{mirror.address}"),))
        where = BlobLocation(proxy.address, REPO, pushed)
        assert fetch.fetch(where, 0, 100) == (DATA[:100], mirror.address)
        assert proxy.bytes_of(pushed) == 0 and counters.get("bytes_from_mirrors") == 100
        mirror.state.status = 500
        assert fetch.fetch(where, 100, 200) == (DATA[100:200], proxy.address)
        asked = len(mirror.state.requests)
        assert fetch.fetch(where, 200, 300) == (DATA[200:300], proxy.address)
        assert len(mirror.state.requests) == asked  # resting
    finally:
        mirror.down()


def test_a_mirror_that_does_not_accept_costs_one_connect_bound(pushed, proxy) -> None:
    """A mirror whose host takes no connection (its listen queue is full: the SYN goes
    unanswered, as from a host that is down) is given up after connect_timeout, well before
    the read timeout, rests, and every read of the blob comes from the origin."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue (nobody accepts)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            fillers.append(filler)
        port = silent.getsockname()[1]
        fetch, counters = fetcher(mirrors=(Mirror(f"http://127.0.0.1:{port}"),),
                                  connect_timeout=0.5, timeout=60.0)  # fmt: skip
        no_answer = metrics.REGISTRY_ERRORS.labels(metrics.STATUS_NO_ANSWER)
        before = no_answer.value
        where = BlobLocation(proxy.address, REPO, pushed)
        for n in range(20):
            assert fetch.fetch(where, n * 100, n * 100 + 100) == (
                DATA[n * 100 : n * 100 + 100], proxy.address)  # fmt: skip
        assert proxy.bytes_of(pushed) == 2000 and counters.get("bytes_from_mirrors") == 0
        # One wait on the mirror (then it rests): one request without an answer, not 20.
        assert no_answer.value - before == 1
    finally:
        for filler in fillers:
            filler.close()
        silent.close()


def test_a_pull_through_cache_filling_is_passed_over_not_rested(
    pushed, registry, proxy, tmp_path, monkeypatch
) -> None:
    """Debian's docker-registry in proxy mode sends a blob it does not hold yet whole (Range
    ignored) while it stores it: that read goes to the origin at once (the whole blob is not
    read), the mirror is not asked for that blob for a while but not rested; once stored, the
    mirror serves the ranges."""
    monkeypatch.setattr(registry_fetch, "MIRROR_FILLING_SECONDS", 1.0)
    with PullThroughCache(tmp_path, registry.address) as cache:
        fetch, counters = fetcher(mirrors=(Mirror(f"http://{cache.address}"),))
        where = BlobLocation(proxy.address, REPO, pushed)
        assert fetch.fetch(where, 5000, 6000) == (DATA[5000:6000], proxy.address)
        assert proxy.bytes_of(pushed) == 1000
        asked = len(cache.requests())
        assert fetch.fetch(where, 6000, 7000) == (DATA[6000:7000], proxy.address)
        assert len(cache.requests()) == asked  # filling: not asked again for this blob
        time.sleep(1.1)
        deadline = time.monotonic() + 30
        while True:  # the cache stores the blob in the background
            data, source = fetch.fetch(where, 7000, 8000)
            assert data == DATA[7000:8000]
            if source == cache.address or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert source == cache.address, cache.tail()
        assert counters.get("bytes_from_mirrors") == 1000
        assert fetch.fetch(where, 100_000, 150_000) == (DATA[100_000:150_000], cache.address)
        blob_uris = [u for u in cache.requests() if "/blobs/" in u]
        assert blob_uris and all(u.endswith(f"?ns={proxy.address.replace(':', '%3A')}")
                                 for u in blob_uris)  # fmt: skip


def test_a_mirror_for_another_registry_is_not_asked(pushed, registry, proxy) -> None:
    mirror = Proxy(registry.address)
    try:
        fetch, _ = fetcher(mirrors=(Mirror(f"http://{mirror.address}", "docker.io"),))
        fetch.fetch(BlobLocation(proxy.address, REPO, pushed), 0, 100)
        assert mirror.state.requests == [] and proxy.bytes_of(pushed) == 100
    finally:
        mirror.down()


def test_a_mirror_of_every_registry_is_told_each_blobs_registry(pushed, registry, proxy) -> None:
    """One repository name on two registries, one mirror for all: each request carries its
    own registry's ns= (the mirror's sessions are kept per registry, not per repository)."""
    mirror = Proxy(registry.address)
    try:
        fetch, _ = fetcher(mirrors=(Mirror(f"http://{mirror.address}"),))
        for origin in (proxy.address, registry.address, proxy.address):
            assert fetch.fetch(BlobLocation(origin, REPO, pushed), 0, 10)[1] == mirror.address
        assert mirror.state.queries == [
            urlencode({"ns": origin}) for origin in (proxy.address, registry.address, proxy.address)
        ]
    finally:
        mirror.down()


def test_a_token_server_that_does_not_answer_is_tried_again(pushed, proxy) -> None:
    """A realm nobody answers on is a network failure (retried, counted as no answer), not
    a refusal; once it answers, the read succeeds."""
    proxy.state.credentials = ("alice", "pw")
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{placeholder.getsockname()[1]}"
    proxy.state.token_realm = f"http://{dead}/token"
    fetch, counters = fetcher(retries=2)
    where = BlobLocation(proxy.address, REPO, pushed)
    before = metrics.REGISTRY_ERRORS.labels(metrics.STATUS_NO_ANSWER).value
    with pytest.raises(FetchError, match=r"failed 3 times; last: .*token request failed"):
        fetch.fetch(where, 0, 10)
    assert counters.get("fetch_retries") == 2
    assert metrics.REGISTRY_ERRORS.labels(metrics.STATUS_NO_ANSWER).value == before + 3


def test_mirror_settings_and_loopback_hosts() -> None:
    assert parse_mirrors([" http://a:4001/ ", "docker.io=https://m.example "]) == (
        Mirror("http://a:4001"), Mirror("https://m.example", "docker.io"))  # fmt: skip
    assert parse_mirrors([]) == ()
    with pytest.raises(ValueError, match="expected"):
        parse_mirrors(["ftp://x"])
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:80")
    assert not is_loopback("registry.example:5000") and not is_loopback("10.0.0.1")
