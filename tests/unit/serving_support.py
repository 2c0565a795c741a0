"""Helpers for apulld's serving tests: converted test images, a counting / corrupting /
failing HTTP proxy in front of the test registry, an apulld process with a stand-in for
systemd (notify socket with an fd store), and EROFS mounts of the FUSE files."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from apull.image.convert import ConvertOptions, convert
from apull.lab import test_image
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient
from apull_node.daemon import fuse_mount
from apull_node.image import format as fmt
from apull_node.image.reference import parse_reference

MULTI_REPO = "test/files"
CHUNK = 64 * 1024
TOKEN = "tok-apull-test"
SRC = Path(__file__).resolve().parents[2] / "src"


# -- images -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    repo: str
    digest: str
    size: int
    chunk_table: str
    chunk_table_size: int
    chunk_size: int
    files: dict[str, bytes]  # regular files of the source tar
    links: dict[str, str]  # symlinks of the source tar

    @property
    def blob_id(self) -> str:
        return "b-" + self.digest.removeprefix("sha256:")[:20]

    def config(self, registry: str, **extra: Any) -> dict[str, Any]:
        return {
            "blob_id": self.blob_id, "fsid": "img", "registry": registry, "repo": self.repo,
            "digest": self.digest, "size": self.size, "chunk_table": self.chunk_table,
            "chunk_table_size": self.chunk_table_size, "chunk_size": self.chunk_size, **extra,
        }  # fmt: skip


def multi_tar() -> bytes:
    rng = random.Random(20260601)
    files = {
        "etc/hostname": b"apull\n",
        "data/big": rng.randbytes(4 << 20),
        "data/medium": rng.randbytes(300 * 1024 + 123),
        "data/text": b"".join(b"line %d of the text file\n" % i for i in range(2000)),
        "deep/a/b/c/leaf": b"leaf\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("etc", "data", "deep", "deep/a", "deep/a/b", "deep/a/b/c"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def push_multi(registry: RegistryClient) -> None:
    tar = multi_tar()
    layer = Blob(OCI_LAYER_GZIP, gzip.compress(tar, compresslevel=1, mtime=0))
    config = {
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }  # fmt: skip
    registry.push_image(MULTI_REPO, "latest", Blob(OCI_CONFIG, json.dumps(config).encode()),
                        [layer])  # fmt: skip


def tar_contents(tar: bytes) -> tuple[dict[str, bytes], dict[str, str]]:
    files, links = {}, {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive.getmembers():
            if member.isreg():
                files[member.name] = archive.extractfile(member).read()  # type: ignore[union-attr]
            elif member.issym():
                links[member.name] = member.linkname
    return files, links


def convert_layer(
    registry: RegistryClient, repo: str, tar: bytes, chunk_size: int = CHUNK
) -> Layer:
    address = registry.address
    options = ConvertOptions(
        source=parse_reference(f"{address}/{repo}:latest"),
        target=parse_reference(f"{address}/{repo}:apull"),
        source_insecure=True,
        target_insecure=True,
        chunk_size=chunk_size,
    )
    result = convert(options)
    layer = result.layers[0].layer
    notes = layer.annotations
    files, links = tar_contents(tar)
    return Layer(
        repo, layer.digest, layer.size, notes[fmt.LAYER_CHUNK_TABLE],
        int(notes[fmt.LAYER_CHUNK_TABLE_SIZE]), int(notes[fmt.LAYER_CHUNK_SIZE]), files, links,
    )  # fmt: skip


def converted_images(registry: RegistryClient) -> dict[str, Layer]:
    """The busybox test image and a multi-file one (a 4 MiB file), 64 KiB chunks."""
    test_image.push(registry)
    push_multi(registry)
    busybox_tar = gzip.decompress(test_image.build()[1].data)
    return {
        "busybox": convert_layer(registry, test_image.REPO, busybox_tar),
        "multi": convert_layer(registry, MULTI_REPO, multi_tar()),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the proxy --------------------------------------------------------------------------------


@dataclass
class Corruption:
    offset: int  # blob offset whose byte is flipped in any response covering it
    times: int  # how many responses to spoil; -1: all


@dataclass
class ProxyState:
    upstream: str
    blob_bytes: Counter[str] = field(default_factory=Counter)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    corrupt: dict[str, Corruption] = field(default_factory=dict)
    status: int = 0  # answer blob GETs with this status instead (0: forward)
    status_times: int = -1  # that many times (-1: always)
    delay: float = 0.0  # seconds before answering a blob GET
    waiting: threading.Event = field(default_factory=threading.Event)
    credentials: tuple[str, str] | None = None  # require a token, given for these
    token_realm: str = ""  # the challenge's realm instead of this proxy's /token
    connections: int = 0  # accepted so far (TLS attempts too: they never become requests)
    queries: list[str] = field(default_factory=list)  # the query of each request, as sent
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def setup(self) -> None:
        super().setup()
        with self.server.state.lock:
            self.server.connections.add(self.connection)
            self.server.state.connections += 1

    def finish(self) -> None:
        with self.server.state.lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_GET(self) -> None:
        self._serve("GET")

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, method: str) -> None:
        state = self.server.state
        path, _, query = self.path.partition("?")
        with state.lock:
            state.queries.append(query)
        if path == "/token":
            pair = ":".join(state.credentials or ("", "")).encode()
            if self.headers.get("Authorization") == "Basic " + base64.b64encode(pair).decode():
                return self._send(200, {}, json.dumps({"token": TOKEN}).encode(), False)
            return self._send(401, {}, b'{"errors":[{"code":"DENIED","message":"bad"}]}', False)
        if state.credentials and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            realm = state.token_realm or f"http://{self.server.address}/token"
            challenge = f'Bearer realm="{realm}",service="proxy"'
            return self._send(401, {"WWW-Authenticate": challenge}, b"{}", method == "HEAD")
        blob = "/blobs/sha256:" in path and method == "GET"
        if blob and state.delay:
            state.waiting.set()
            time.sleep(state.delay)
        if blob and state.status and state.status_times != 0:
            state.status_times -= 1 if state.status_times > 0 else 0
            with state.lock:
                state.requests.append((path.rsplit("/", 1)[1], "", state.status))
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"test says no"}]}'
            return self._send(state.status, {}, body, False)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "accept")}
        conn = http.client.HTTPConnection(state.upstream, timeout=30)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            got = {k: v for k, v in resp.getheaders() if k.lower() != "content-length"}
            got.pop("Transfer-Encoding", None)
        finally:
            conn.close()
        if blob:
            digest = path.rsplit("/", 1)[1]
            start = int(got.get("Content-Range", "bytes 0-").split(" ")[1].split("-")[0])
            body = self._spoil(state, digest, start, body)
            with state.lock:
                state.blob_bytes[digest] += len(body)
                state.requests.append((digest, self.headers.get("Range", ""), resp.status))
        self._send(resp.status, got, body, method == "HEAD")

    @staticmethod
    def _spoil(state: ProxyState, digest: str, start: int, body: bytes) -> bytes:
        with state.lock:
            bad = state.corrupt.get(digest)
            if bad is None or not start <= bad.offset < start + len(body) or bad.times == 0:
                return body
            bad.times -= 1 if bad.times > 0 else 0
        spoiled = bytearray(body)
        spoiled[bad.offset - start] ^= 0xFF
        return bytes(spoiled)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, state: ProxyState) -> None:
        self.state = state
        self.address = f"127.0.0.1:{port}"
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _Handler)


class Proxy:
    """A registry front that counts blob bytes and can corrupt, fail, delay or go away."""

    def __init__(self, upstream: str) -> None:
        self.state = ProxyState(upstream)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._server: _ProxyServer | None = None
        self.up()

    def up(self) -> None:
        self._server = _ProxyServer(self.port, self.state)
        threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True).start()

    def down(self) -> None:
        """Stop listening: connections are refused until up()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self.state.lock:
                for conn in self._server.connections:  # keep-alive ones too
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
            self._server = None

    def bytes_of(self, digest: str) -> int:
        with self.state.lock:
            return self.state.blob_bytes[digest]

    def reset(self) -> None:
        with self.state.lock:
            self.state.blob_bytes.clear()
            self.state.requests.clear()


# -- apulld -----------------------------------------------------------------------------------


_WRAPPER = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3); os.close(fd)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='apulld-fuse')\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'apull_node.daemon', *sys.argv[2:]])\n"
)


class Apulld:
    """apulld --backend file in a subprocess; the test plays systemd (notify + fd store)."""

    def __init__(self, root: Path, settings: dict[str, Any] | None = None) -> None:
        self.root = root
        self.address = str(root / "apulld.sock")
        self.cache_dir = root / "data" / "cachefiles"
        self.mountpoint = root / "data" / "apulld" / "fuse"
        self.log_path = root / "apulld.log"
        self.settings = {"fetch_retries": 2, "fetch_timeout_s": 5, **(settings or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.stored_fd: int | None = None
        self.messages: list[str] = []
        self._ready = threading.Event()
        self._notify: socket.socket | None = None
        self._receiver: threading.Thread | None = None

    # The stand-in for systemd.

    def _listen(self) -> None:
        path = str(self.root / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(path)
        self._receiver = threading.Thread(target=self._receive, args=(self._notify,), daemon=True)
        self._receiver.start()

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
            except OSError:
                return
            if not data and not fds:  # shut down by close()
                return
            text = data.decode()
            self.messages.append(text)
            if "FDSTORE=1" in text and fds:
                if self.stored_fd is not None:
                    os.close(self.stored_fd)
                self.stored_fd = fds[0]
            elif fds:
                for fd in fds:
                    os.close(fd)
            if text.startswith("READY=1"):
                self._ready.set()

    def start(self, *, fdstore: bool = True, resume: bool = False, timeout: float = 20) -> None:
        config = self.root / "config.toml"
        lines = ["version = 1", "[apulld]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.settings.items()]
        config.write_text("\n".join(lines) + "\n")
        args = ["--config", str(config), "--backend", "file", "--address", self.address,
                "--cache-dir", str(self.cache_dir), "--log-level", "debug"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        if fdstore:
            if self._notify is None:
                self._listen()
            env["NOTIFY_SOCKET"] = str(self.root / "notify.sock")
        self._ready.clear()
        pass_fds: tuple[int, ...] = ()
        if resume and self.stored_fd is not None:
            command = [sys.executable, "-c", _WRAPPER, str(self.stored_fd), *args]
            pass_fds = (self.stored_fd,)
        else:
            command = [sys.executable, "-m", "apull_node.daemon", *args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stderr=log, pass_fds=pass_fds)
        deadline = time.monotonic() + timeout
        while not self._ready.is_set() if fdstore else not os.path.exists(self.address):
            if self.process.poll() is not None:
                raise AssertionError(f"apulld exited {self.process.returncode}: {self.log()}")
            assert time.monotonic() < deadline, f"apulld not ready: {self.log()}"
            time.sleep(0.05)
        if not fdstore:
            self.wait_for_socket(deadline)

    def wait_for_socket(self, deadline: float) -> None:
        while True:
            with contextlib.suppress(OSError):
                if self.request("PUT", "/v1.0/apulld/ping")[0] == 200:
                    return
            assert time.monotonic() < deadline, f"apulld not answering: {self.log()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(20)
        self.process = None
        return code

    def close(self) -> None:
        """Finalizer: stop apulld, drop the stored fd, unmount what is left."""
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.stop(signal.SIGKILL)
        if self._notify is not None:
            # Wake the receiver before closing: a thread blocked in recvmsg on a closed
            # socket can pick up the next socket that gets the same fd number.
            with contextlib.suppress(OSError):
                self._notify.shutdown(socket.SHUT_RDWR)
            if self._receiver is not None:
                self._receiver.join(5)
            self._notify.close()
            self._notify = None
        if self.stored_fd is not None:
            os.close(self.stored_fd)
            self.stored_fd = None
        for entry in reversed(fuse_mount.read_mountinfo()):
            if entry.mountpoint.startswith(str(self.root)) or entry.source.startswith(
                str(self.root)
            ):
                with contextlib.suppress(OSError):
                    fuse_mount.unmount(entry.mountpoint)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = _UnixConnection(self.address)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(raw) if raw else None

    def ping(self) -> dict[str, Any]:
        status, body = self.request("PUT", "/v1.0/apulld/ping")
        assert status == 200, body
        return dict(body)

    def stats(self) -> dict[str, int]:
        return dict(self.ping()["serving"]["stats"])

    def put(self, layer: Layer, registry: str, **extra: Any) -> str:
        status, body = self.request("PUT", "/v1.0/apulld/blob_config",
                                    layer.config(registry, **extra))  # fmt: skip
        assert status == 201, body
        return str(body["path"])


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("apulld", timeout=30)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


# -- EROFS mounts and comparisons -------------------------------------------------------------


class Mounts:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.active: list[str] = []

    def erofs(self, source: str, name: str) -> Path:
        target = self.root / "mnt" / name
        target.mkdir(parents=True, exist_ok=True)
        fuse_mount.mount_file(source, str(target))
        self.active.append(str(target))
        return target

    def umount(self, target: Path) -> None:
        fuse_mount.unmount(str(target), detach=False)
        self.active.remove(str(target))

    def close(self) -> None:
        for target in reversed(self.active):
            with contextlib.suppress(OSError):
                fuse_mount.unmount(target)
        self.active.clear()


def check_tree(mount: Path, layer: Layer) -> None:
    """Every regular file and symlink of the source tar is in the mount, byte for byte."""
    for name, data in layer.files.items():
        got = (mount / name).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
    for name, target in layer.links.items():
        assert os.readlink(mount / name) == target, name
