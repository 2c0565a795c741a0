"""The metric primitives and their Prometheus text (exposition format 0.0.4), the
metrics_address settings, and the HTTP endpoint that serves GET /metrics."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
from pathlib import Path

import pytest

from apull_node.service.metrics import (
    CONTENT_TYPE,
    Counter,
    Histogram,
    Registry,
    escape_help,
    escape_label_value,
)
from apull_node.service.metrics_endpoint import MetricsEndpoint, serve_metrics
from apull_node.service.settings import SettingsError, load_settings, parse_listen_address

LOG = logging.getLogger("apull-test")


def test_counters_and_a_histogram_render_as_the_text_format() -> None:
    registry = Registry()
    fetched = registry.counter("apull_test_fetched_bytes_total", "Bytes fetched.", ("kind",))
    events = registry.counter("apull_test_events_total", "Events.")
    latency = registry.histogram("apull_test_duration_seconds", "Time.", (0.125, 1, 5))
    layer = fetched.labels("layer")
    layer.inc(100)
    layer.inc(23)
    fetched.labels("chunk_table").inc(7)
    events.inc()
    for seconds in (0.0625, 0.125, 0.5, 2, 7):  # 0.125 is on a bound: counted in it (le)
        latency.observe(seconds)
    assert registry.render() == (
        "# HELP apull_test_fetched_bytes_total Bytes fetched.\n"
        "# TYPE apull_test_fetched_bytes_total counter\n"
        'apull_test_fetched_bytes_total{kind="chunk_table"} 7\n'
        'apull_test_fetched_bytes_total{kind="layer"} 123\n'
        "# HELP apull_test_events_total Events.\n"
        "# TYPE apull_test_events_total counter\n"
        "apull_test_events_total 1\n"
        "# HELP apull_test_duration_seconds Time.\n"
        "# TYPE apull_test_duration_seconds histogram\n"
        'apull_test_duration_seconds_bucket{le="0.125"} 2\n'
        'apull_test_duration_seconds_bucket{le="1.0"} 3\n'
        'apull_test_duration_seconds_bucket{le="5.0"} 4\n'
        'apull_test_duration_seconds_bucket{le="+Inf"} 5\n'
        "apull_test_duration_seconds_sum 9.6875\n"
        "apull_test_duration_seconds_count 5\n"
    )
    assert layer.value == 123 and events.value == 1


def test_labelled_histograms_put_le_last_and_start_empty() -> None:
    registry = Registry()
    mounts = registry.histogram("apull_test_mount_seconds", "Mounts.", (1,), ("backend", "result"))
    assert registry.render().splitlines()[2:] == []  # no series before the first use
    mounts.labels("file", "ok").observe(0.5)
    mounts.labels("file", "ok").observe(3)
    mounts.labels("fscache", "error").observe(1)
    assert registry.render().splitlines()[2:] == [
        'apull_test_mount_seconds_bucket{backend="file",result="ok",le="1.0"} 1',
        'apull_test_mount_seconds_bucket{backend="file",result="ok",le="+Inf"} 2',
        'apull_test_mount_seconds_sum{backend="file",result="ok"} 3.5',
        'apull_test_mount_seconds_count{backend="file",result="ok"} 2',
        'apull_test_mount_seconds_bucket{backend="fscache",result="error",le="1.0"} 1',
        'apull_test_mount_seconds_bucket{backend="fscache",result="error",le="+Inf"} 1',
        'apull_test_mount_seconds_sum{backend="fscache",result="error"} 1.0',
        'apull_test_mount_seconds_count{backend="fscache",result="error"} 1',
    ]


def test_label_values_and_help_are_escaped() -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert escape_help('say "x"\\y\nz') == 'say "x"\\\\y\\nz'
    registry = Registry()
    errors = registry.counter("apull_test_errors_total", 'One "quoted"\nhelp \\ line.', ("why",))
    errors.labels('bad "reply"\n\\').inc(2)
    assert registry.render() == (
        '# HELP apull_test_errors_total One "quoted"\\nhelp \\\\ line.\n'
        "# TYPE apull_test_errors_total counter\n"
        'apull_test_errors_total{why="bad \\"reply\\"\\n\\\\"} 2\n'
    )


def test_label_sets_are_capped_and_the_rest_counted_as_other() -> None:
    registry = Registry()
    statuses = registry.counter("apull_test_status_total", "By status.", ("status",), 2)
    for status, times in (("500", 1), ("503", 2), ("404", 4), ("418", 8)):
        statuses.labels(status).inc(times)
    assert registry.render().splitlines()[2:] == [
        'apull_test_status_total{status="500"} 1',
        'apull_test_status_total{status="503"} 2',
        'apull_test_status_total{status="other"} 12',
    ]


def test_updates_from_many_threads_are_all_counted() -> None:
    counter = Counter("apull_test_adds_total", "Adds.")
    histogram = Histogram("apull_test_seconds", "Seconds.", (0.5,))

    def work() -> None:
        for _ in range(5000):
            counter.inc(2)
            histogram.observe(1.0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.value == 80_000
    assert histogram.render()[-3:] == [
        'apull_test_seconds_bucket{le="+Inf"} 40000',
        "apull_test_seconds_sum 40000.0",
        "apull_test_seconds_count 40000",
    ]


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda: Counter("apull_test_bytes", "x"), "does not end in _total"),
        (lambda: Counter("apull-test_total", "x"), "not a Prometheus name"),
        (lambda: Counter("apull_test_total", "x", ("le",)), "label name 'le'"),
        (lambda: Counter("apull_test_total", "x", ("a", "a")), "label names repeat"),
        (lambda: Histogram("apull_test_seconds", "x", (1, 0.5)), "increasing"),
        (lambda: Histogram("apull_test_seconds", "x", ()), "at least one"),
    ],
)
def test_bad_definitions_are_refused(make, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        make()


def test_bad_updates_are_refused() -> None:
    registry = Registry()
    counter = registry.counter("apull_test_total", "x", ("kind",))
    with pytest.raises(ValueError, match="use labels"):
        counter.inc()
    with pytest.raises(ValueError, match="expected values for"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="registered already"):
        registry.counter("apull_test_total", "again")


# -- settings ---------------------------------------------------------------------------------


def test_metrics_are_off_by_default_and_on_with_an_address(tmp_path: Path) -> None:
    defaults = load_settings(tmp_path / "absent.toml")
    assert defaults.apulld.metrics_address == "" and defaults.snapshotter.metrics_address == ""
    path = tmp_path / "config.toml"
    path.write_text(
        'version = 1\n[apulld]\nmetrics_address = "127.0.0.1:9810"\n'
        '[snapshotter]\nmetrics_address = "[::1]:9811"\n'
    )
    settings = load_settings(path)
    assert parse_listen_address(settings.apulld.metrics_address) == ("127.0.0.1", 9810)
    assert parse_listen_address(settings.snapshotter.metrics_address) == ("::1", 9811)
    assert parse_listen_address("") is None
    assert parse_listen_address("node-1.lab:80") == ("node-1.lab", 80)


@pytest.mark.parametrize(
    ("table", "value", "said"),
    [
        ("apulld", '"9810"', "expected host:port"),
        ("apulld", '":9810"', "expected host:port"),
        ("apulld", '"127.0.0.1:"', "port '' is not a number from 1 to 65535"),
        ("apulld", '"127.0.0.1:70000"', "port '70000' is not a number"),
        ("apulld", '"127.0.0.1:0"', "port '0' is not a number"),
        ("snapshotter", '"::1:9810"', "an IPv6 address goes in brackets"),
        ("snapshotter", '"[not:v6]:9810"', "[not:v6] is not an IPv6 address"),
        ("snapshotter", '"http://127.0.0.1:9810"', "is not a host name or IPv4 address"),
        ("snapshotter", '"300.1.1.1:9810"', "'300.1.1.1' is not a host name or IPv4"),
        ("snapshotter", "9810", "expected str, got 9810"),
    ],
)
def test_a_bad_metrics_address_is_refused_naming_the_key(
    tmp_path: Path, table: str, value: str, said: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"version = 1\n[{table}]\nmetrics_address = {value}\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}: [{table}] metrics_address: ")
    assert said in str(err.value)


# -- the endpoint -----------------------------------------------------------------------------


def get(host: str, port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.getheader("Content-Type", ""), reply.read().decode()
    finally:
        conn.close()


def test_the_endpoint_serves_get_metrics_only() -> None:
    registry = Registry()
    hits = registry.counter("apull_test_hits_total", "Hits.")
    endpoint = MetricsEndpoint(("127.0.0.1", 0), registry, LOG)
    endpoint.start()
    try:
        host, port = endpoint.address
        assert port != 0 and endpoint.url == f"http://127.0.0.1:{port}/metrics"
        hits.inc(3)
        status, content_type, body = get(host, port, "/metrics")
        assert (status, content_type) == (200, CONTENT_TYPE)
        assert body == registry.render() and "apull_test_hits_total 3\n" in body
        assert get(host, port, "/metrics?x=1")[0] == 200
        assert get(host, port, "/")[0] == 404
        assert get(host, port, "/metrics/x")[0] == 404
        assert get(host, port, "/metrics", "POST")[0] == 501
    finally:
        endpoint.stop()
    endpoint.stop()  # twice: harmless
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
        pass  # closed


def test_an_address_in_use_is_logged_and_the_service_goes_on(caplog) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="apull-test"):
            assert serve_metrics(("127.0.0.1", port), Registry(), LOG) is None
    assert f"metrics not served: cannot listen on 127.0.0.1 port {port}" in caplog.text
    assert serve_metrics(None, Registry(), LOG) is None  # off
