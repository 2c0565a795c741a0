"""apulld's HTTP API over a real unix socket, against `apulld --backend none` in a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apull_node import __version__

DIGEST = "sha256:" + "ab" * 32
BLOB = {
    "blob_id": "blob-1",
    "domain_id": "dom1",
    "registry": "127.0.0.1:5000",
    "repo": "library/nginx",
    "digest": DIGEST,
    "size": 123456,
}


def run_apulld(*args: str) -> subprocess.CompletedProcess[str]:
    """apulld to completion (startup errors, --check-backend)."""
    return subprocess.run(
        [sys.executable, "-m", "apull_node.daemon", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("apulld", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


class Daemon:
    """One apulld process with its own socket, cache dir and systemd notify socket."""

    def __init__(self, root: Path, backend: str = "none") -> None:
        self.root = root
        self.backend = backend
        self.address = str(root / "s.sock")
        self.cache_dir = root / "data" / "cachefiles"
        self.blobs_file = root / "data" / "apulld" / "blobs.json"
        self.process: subprocess.Popen[str] | None = None

    def start(self, *extra: str) -> float:
        """Start and wait for READY=1 on the notify socket; return the seconds it took."""
        notify_path = str(self.root / "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(15)
        started = time.monotonic()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "apull_node.daemon",
                "--config",
                str(self.root / "absent.toml"),
                "--backend",
                self.backend,
                "--address",
                self.address,
                "--cache-dir",
                str(self.cache_dir),
                "--log-level",
                "debug",
                *extra,
            ],
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            message = notify.recv(4096).decode()
            while message.startswith("FDSTORE=1"):  # the file backend stores its FUSE fd first
                message = notify.recv(4096).decode()
        finally:
            notify.close()
            os.unlink(notify_path)
        assert message.startswith(f"READY=1\nSTATUS=backend {self.backend}"), message
        return time.monotonic() - started

    def stop(self) -> tuple[int, str]:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=10)
        return self.process.returncode, stderr

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        connection = UnixConnection(self.address)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            connection.request(method, path, body=data)
            response = connection.getresponse()
            payload = response.read()
            headers = {key.lower(): value for key, value in response.getheaders()}
        finally:
            connection.close()
        return response.status, headers, json.loads(payload) if payload else None


@pytest.fixture
def root() -> Iterator[Path]:
    # Short: a unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="apulld-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(root: Path) -> Iterator[Daemon]:
    running = Daemon(root)
    running.start()
    yield running
    if running.process is not None and running.process.poll() is None:
        running.stop()


def test_ping_reports_backend_reasons_and_process(daemon: Daemon) -> None:
    for method in ("PUT", "GET"):
        status, headers, body = daemon.request(method, "/v1.0/apulld/ping")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert body == {
            "status": "ok",
            "backend": "none",
            "reasons": ["none: chosen by settings"],
            "version": __version__,
            "pid": daemon.process.pid,
            "blobs": 0,
        }


def test_socket_and_data_dirs_are_private(daemon: Daemon) -> None:
    assert stat.S_ISSOCK(os.stat(daemon.address).st_mode)
    assert stat.S_IMODE(os.stat(daemon.address).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.cache_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.blobs_file.parent).st_mode) == 0o700


def test_blob_config_add_list_replace_delete(daemon: Daemon) -> None:
    status, _, body = daemon.request("PUT", "/v1.0/apulld/blob_config", BLOB)
    assert status == 201
    assert body == {**BLOB, "fsid": "", "created": True, "backend": "none"}
    assert daemon.request("PUT", "/v1.0/apulld/ping")[2]["blobs"] == 1

    bigger = {**BLOB, "size": 999}
    status, _, body = daemon.request("PUT", "/v1.0/apulld/blob_config", bigger)
    assert (status, body["created"], body["size"]) == (201, False, 999)
    status, _, body = daemon.request("GET", "/v1.0/apulld/blob_config")
    assert status == 200
    assert body == {"blobs": [{**bigger, "fsid": ""}]}

    status, headers, body = daemon.request("DELETE", "/v1.0/apulld/blob_config?blob_id=blob-1")
    assert (status, body) == (204, None)
    assert "content-length" not in headers
    assert daemon.request("GET", "/v1.0/apulld/blob_config")[2] == {"blobs": []}
    status, _, body = daemon.request("DELETE", "/v1.0/apulld/blob_config?blob_id=blob-1")
    assert (status, body) == (404, {"error": "blob_id: no blob 'blob-1'"})
    status, _, body = daemon.request("DELETE", "/v1.0/apulld/blob_config")
    assert (status, body) == (400, {"error": "blob_id: required once in the query string"})


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"blob_id": None}, "blob_id: required"),
        ({"blob_id": "a/b"}, "blob_id: 'a/b' is not letters, digits"),
        ({"domain_id": None}, "domain_id: one of domain_id or fsid is required"),
        ({"domain_id": "a,b"}, "domain_id: 'a,b' is not"),
        ({"fsid": 7}, "fsid: expected a string, got 7"),
        ({"registry": "https://r.example"}, "registry: 'https://r.example' is not host[:port]"),
        ({"repo": "Library/Nginx"}, "repo: 'Library/Nginx' is not a repository name"),
        ({"digest": "sha256:abc"}, "digest: 'sha256:abc' is not sha256:<64 hex>"),
        ({"size": True}, "size: expected a positive integer, got True"),
        ({"size": 0}, "size: expected a positive integer, got 0"),
        ({"size": "12"}, "size: expected a positive integer, got '12'"),
        ({"colour": "red"}, "colour: unknown field (known: blob_id, chunk_size, chunk_table,"),
    ],
)
def test_blob_config_validation_names_the_field(daemon: Daemon, change: dict, error: str) -> None:
    body = {key: value for key, value in {**BLOB, **change}.items() if value is not None}
    status, _, reply = daemon.request("PUT", "/v1.0/apulld/blob_config", body)
    assert status == 400
    assert reply["error"].startswith(error), reply
    assert daemon.request("GET", "/v1.0/apulld/blob_config")[2] == {"blobs": []}


def test_blob_config_body_must_be_a_json_object(daemon: Daemon) -> None:
    status, _, reply = daemon.request("PUT", "/v1.0/apulld/blob_config", raw=b"{not json")
    assert status == 400
    assert reply["error"].startswith("body: not JSON")
    status, _, reply = daemon.request("PUT", "/v1.0/apulld/blob_config", [BLOB])
    assert (status, reply) == (400, {"error": "body: expected a JSON object"})
    status, _, reply = daemon.request("PUT", "/v1.0/apulld/blob_config", raw=b"x" * 70000)
    assert status == 413


def test_unknown_paths_and_wrong_methods(daemon: Daemon) -> None:
    status, _, body = daemon.request("GET", "/v1.0/apulld/nope")
    assert (status, body) == (404, {"error": "no such path: /v1.0/apulld/nope"})
    status, headers, body = daemon.request("POST", "/v1.0/apulld/ping")
    assert (status, headers["allow"]) == (405, "GET, PUT")
    assert body == {"error": "POST not allowed (allowed: GET, PUT)"}
    status, headers, _ = daemon.request("PATCH", "/v1.0/apulld/blob_config")
    assert (status, headers["allow"]) == (405, "DELETE, GET, PUT")


def test_keep_alive_serves_several_requests_on_one_connection(daemon: Daemon) -> None:
    connection = UnixConnection(daemon.address)
    try:
        for path in ("/v1.0/apulld/ping", "/v1.0/apulld/nope", "/v1.0/apulld/ping"):
            connection.request("PUT", path, body=b"{}")
            response = connection.getresponse()
            assert response.status in (200, 404)
            json.loads(response.read())
    finally:
        connection.close()


def test_blobs_survive_a_restart_and_shutdown_is_clean(root: Path) -> None:
    first = Daemon(root)
    first.start()
    assert first.request("PUT", "/v1.0/apulld/blob_config", BLOB)[0] == 201
    second_blob = {**BLOB, "blob_id": "blob-2", "domain_id": "", "fsid": "img2"}
    assert first.request("PUT", "/v1.0/apulld/blob_config", second_blob)[0] == 201
    assert first.request("DELETE", "/v1.0/apulld/blob_config?blob_id=blob-1")[0] == 204
    assert stat.S_IMODE(os.stat(first.blobs_file).st_mode) == 0o600
    returncode, stderr = first.stop()
    assert returncode == 0, stderr
    assert "SIGTERM: shutting down" in stderr
    assert not os.path.exists(first.address)

    second = Daemon(root)
    second.start()
    try:
        status, _, body = second.request("GET", "/v1.0/apulld/blob_config")
        assert (status, body) == (200, {"blobs": [second_blob]})
        assert second.request("PUT", "/v1.0/apulld/ping")[2]["blobs"] == 1
    finally:
        assert second.stop()[0] == 0
    saved = json.loads(second.blobs_file.read_text())
    assert saved == {"version": 1, "blobs": [second_blob]}


def test_second_daemon_on_a_live_socket_refuses_to_start(daemon: Daemon, root: Path) -> None:
    result = run_apulld(
        "--config", str(root / "absent.toml"), "--backend", "none",
        "--address", daemon.address, "--cache-dir", str(root / "other" / "cachefiles"),
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{daemon.address}: another process is listening" in result.stderr
    assert daemon.request("PUT", "/v1.0/apulld/ping")[0] == 200


def test_unusable_socket_path_is_a_startup_error(root: Path) -> None:
    address = str(root / ("x" * 120))
    result = run_apulld(
        "--backend", "none", "--address", address,
        "--config", str(root / "absent.toml"), "--cache-dir", str(root / "c"),
    )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on {address}: AF_UNIX path too long" in result.stderr


def test_broken_blobs_file_stops_startup_with_its_name(root: Path) -> None:
    daemon = Daemon(root)
    daemon.blobs_file.parent.mkdir(parents=True)
    daemon.blobs_file.write_text('{"version": 1, "blobs": [{"blob_id": "x"}]}')
    result = run_apulld(
        "--backend", "none", "--config", str(root / "absent.toml"),
        "--address", daemon.address, "--cache-dir", str(daemon.cache_dir),
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{daemon.blobs_file}: blobs[0]: registry: required" in result.stderr


def test_bad_settings_file_is_a_startup_error(root: Path) -> None:
    config = root / "config.toml"
    config.write_text('[apulld]\nbackend = "magic"\n')
    result = run_apulld("--config", str(config), "--check-backend")
    assert result.returncode == 1
    assert "[apulld] backend: 'magic' is not one of" in result.stderr


def test_daemon_imports_only_the_standard_library() -> None:
    # -S: no site-packages, like the node's bare python3 running the zipapp; below 3.11 the
    # zipapp also carries tomli (tomllib's backport), so that path is given too.
    src = Path(__file__).resolve().parents[2] / "src"
    path = [str(src)]
    if sys.version_info < (3, 11):
        import tomli

        path.append(str(Path(tomli.__file__).parents[1]))
    code = (
        "import sys, sysconfig, apull_node.daemon.main\n"
        "std = sysconfig.get_paths()['stdlib']\n"
        "mods = sorted(n for n, m in list(sys.modules.items())\n"
        "              if (getattr(m, '__file__', None) or std).startswith(std) is False)\n"
        "print('\\n'.join(mods))\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    outside = set(result.stdout.split())
    assert "apull_node.daemon.main" in outside
    bundled = ("apull_node.daemon", "apull_node.service", "apull_node.image", "tomli")
    assert {m for m in outside if not m.startswith(bundled)} == {"apull_node"}
    assert ("tomli" in outside) == (sys.version_info < (3, 11))
