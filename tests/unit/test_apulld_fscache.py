"""apulld's fscache backend without the kernel's on-demand mode (the host has none; node1
runs tests/integration/test_fscache_serving.py): block alignment against a real O_DIRECT
file, fd store names and messages through a real notify socket, the worker pool and fd
lifetimes of the message loop, and the provider's READ path against a real registry behind
a corrupting proxy. /dev/cachefiles is played by a SOCK_SEQPACKET pair (one message per
datagram); an object's anonymous fd by a file opened O_DIRECT."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_support import SRC, Corruption, Layer, Proxy
from test_apulld_ondemand import close_message, open_message, read_message

from apull_node.daemon import fdstore
from apull_node.daemon.backend import BackendUnavailableError, NodePaths, choose_backend
from apull_node.daemon.blob_registry import BlobRegistry, parse_blob_config
from apull_node.daemon.cachefiles_device import OnDemandServer, ReadFailedError
from apull_node.daemon.cachefiles_protocol import OpenRequest, ReadRequest
from apull_node.daemon.chunk_cache import BlobSpec, ChunkCache
from apull_node.daemon.counters import Counters
from apull_node.daemon.fscache_backend import (
    BLOCK,
    FscacheBackend,
    FscacheBackendConfig,
    block_span,
    write_blocks,
)
from apull_node.daemon.http_api import ServingError
from apull_node.daemon.registry_fetch import FetchSettings
from apull_node.image.chunks import ChunkTable

# -- alignment ------------------------------------------------------------------------------


def direct_file(path: Path) -> int:
    """A file opened like a cachefiles cache file: O_DIRECT (misaligned writes: EINVAL)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)


def test_block_span_rounds_out_to_whole_blocks() -> None:
    assert block_span(0, 4096) == (0, 4096)
    assert block_span(0, 1) == (0, 4096)
    assert block_span(4095, 2) == (0, 8192)
    assert block_span(8192, 10000) == (8192, 20480)
    assert block_span(65536, 0) == (65536, 65536)


def test_write_blocks_pads_the_tail_and_obeys_o_direct(tmp_path: Path) -> None:
    fd = direct_file(tmp_path / "cache")
    try:
        # The kernel's rule, shown on the same file: an unaligned buffer length fails.
        with pytest.raises(OSError) as raised:
            os.pwrite(fd, b"x" * 100, 0)
        assert raised.value.errno == errno.EINVAL
        data = os.urandom(10000)
        assert write_blocks(fd, 8192, data) == 12288
        assert os.fstat(fd).st_size == 8192 + 12288
        with open(tmp_path / "cache", "rb") as stream:
            raw = stream.read()
        assert raw[8192 : 8192 + 10000] == data
        assert raw[8192 + 10000 :] == bytes(2288)  # zero padding to the block
        assert raw[:8192] == bytes(8192)  # nothing before the offset touched
        with pytest.raises(ValueError, match="multiple of 4096"):
            write_blocks(fd, 100, data)
        assert write_blocks(fd, 4096, b"") == 0
    finally:
        os.close(fd)


# -- fd store names and messages ------------------------------------------------------------


@pytest.mark.parametrize("blob_id", ["b-1234", "sha256:abcdef", "a.b_c+d-e", "x" * 240, "y:" * 120])
def test_object_fd_names_round_trip_and_are_valid_for_systemd(blob_id: str) -> None:
    name = fdstore.object_fd_name(42, blob_id)
    assert len(name) <= 255 and ":" not in name and name.isprintable() and name.isascii()
    parsed = fdstore.parse_object_fd_name(name)
    assert parsed is not None and parsed.object_id == 42
    assert parsed.matches(blob_id)
    assert not parsed.matches(blob_id + "z")
    if len(blob_id) < 200:
        assert parsed.blob_id == blob_id  # short ids are spelled out (readable in systemd)


def test_other_fd_names_are_not_objects() -> None:
    for name in ("apulld-fuse", "apulld-cachefiles", "cachefiles-obj-x-b", "cachefiles-obj-7",
                 "cachefiles-obj--b", "stored"):  # fmt: skip
        assert fdstore.parse_object_fd_name(name) is None


class NotifySocket:
    """The service manager's end: records each datagram with the fds it carried."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)

    def receive(self) -> tuple[dict[str, str], list[int]]:
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 8)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return fields, fds

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    manager = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(manager.path))
    yield manager
    manager.close()


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_store_and_remove_send_the_fd_and_the_name(notify: NotifySocket, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert fdstore.store(fd, "cachefiles-obj-3-b")
        fields, fds = notify.receive()
        assert fields == {"FDSTORE": "1", "FDNAME": "cachefiles-obj-3-b"}
        assert len(fds) == 1 and same_file(fds[0], fd)
        os.close(fds[0])
        assert fdstore.remove("cachefiles-obj-3-b")
        assert notify.receive() == ({"FDSTOREREMOVE": "1", "FDNAME": "cachefiles-obj-3-b"}, [])
    finally:
        os.close(fd)


def test_without_a_service_manager_nothing_is_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not fdstore.notify_socket()
    assert not fdstore.store(0, "x")
    assert not fdstore.remove("x")


_INHERIT = """
import json, os, sys
from apull_node.daemon import fdstore
for target, path in enumerate(sys.argv[1:], 3):
    fd = os.open(path, os.O_RDONLY)
    if fd != target:
        os.dup2(fd, target); os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(sys.argv) - 1),
                  LISTEN_FDNAMES=os.environ["NAMES"])
got = fdstore.inherited_fds()
print(json.dumps({n: os.readlink(f"/proc/self/fd/{fd}") for n, fd in got.items()}))
print(json.dumps([k for k in os.environ if k.startswith("LISTEN_")]))
"""


def test_inherited_fds_are_named_as_stored(tmp_path: Path) -> None:
    paths = [tmp_path / name for name in ("dev", "obj1", "obj2", "dup")]
    for path in paths:
        path.write_text(path.name)
    names = "apulld-cachefiles:cachefiles-obj-1-b-a:cachefiles-obj-2-b-b:cachefiles-obj-1-b-a"
    out = subprocess.run(
        [sys.executable, "-c", _INHERIT, *map(str, paths)], env={**os.environ,
         "PYTHONPATH": str(SRC), "NAMES": names}, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    got = json.loads(out[0])
    assert got == {
        "apulld-cachefiles": str(paths[0]),
        "cachefiles-obj-1-b-a": str(paths[1]),  # the first of a name wins
        "cachefiles-obj-2-b-b": str(paths[2]),
    }
    assert json.loads(out[1]) == []  # not passed on to children


# -- the message loop: workers, fd lifetimes, the fd store ----------------------------------


@pytest.fixture
def device() -> Iterator[tuple[socket.socket, socket.socket]]:
    daemon_end, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel_end.settimeout(5)
    yield daemon_end, kernel_end
    daemon_end.close()
    kernel_end.close()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class GatedProvider:
    """Serves every object; READs of object 1 wait until `gate` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.served: list[int] = []
        self.adopted: list[tuple[int, str]] = []

    def open(self, request: OpenRequest) -> int:
        return 1 << 20

    def adopt(self, object_id: int, name: fdstore.ObjectFdName) -> bool:
        self.adopted.append((object_id, name.blob_id))
        return name.blob_id != "gone"

    def read(self, request: ReadRequest, anon_fd: int) -> None:
        if request.object_id == 1:
            self.started.set()
            assert self.gate.wait(10)
        if request.object_id == 9:
            raise ReadFailedError("cannot")
        self.served.append(request.msg_id)

    def close(self, object_id: int) -> None:
        return None


class Completions:
    def __init__(self) -> None:
        self.done: list[tuple[int, int]] = []
        self.event = threading.Condition()

    def __call__(self, fd: int, msg_id: int) -> None:
        assert is_open(fd), "completed through a closed fd"
        with self.event:
            self.done.append((fd, msg_id))
            self.event.notify_all()

    def wait_for(self, msg_id: int, timeout: float = 5) -> None:
        with self.event:
            assert self.event.wait_for(lambda: any(m == msg_id for _, m in self.done), timeout)


def temp_fd(tmp_path: Path, name: str) -> int:
    return os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)


def test_a_slow_read_does_not_hold_up_others_and_close_waits_for_it(device, tmp_path) -> None:
    daemon_end, kernel_end = device
    provider, completed = GatedProvider(), Completions()
    server = OnDemandServer(daemon_end.fileno(), provider, completed, workers=3)
    server.start()
    slow, fast = temp_fd(tmp_path, "slow"), temp_fd(tmp_path, "fast")
    kernel_end.send(open_message(1, 1, slow, b"erofs,v\0", b"slow"))
    kernel_end.send(open_message(2, 2, fast, b"erofs,v\0", b"fast"))
    assert kernel_end.recv(64) == b"copen 1,1048576"
    assert kernel_end.recv(64) == b"copen 2,1048576"
    kernel_end.send(read_message(10, 1, 0, 4096))
    assert provider.started.wait(5)
    kernel_end.send(read_message(11, 2, 0, 4096))
    completed.wait_for(11)  # while READ 10 still waits
    assert (slow, 10) not in completed.done and server.reads_in_flight == 1
    # The kernel drops the slow object: its fd stays open until the READ using it ends.
    kernel_end.send(close_message(12, 1))
    deadline = time.monotonic() + 5
    while server.open_objects != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert is_open(slow)
    provider.gate.set()
    completed.wait_for(10)
    deadline = time.monotonic() + 5
    while is_open(slow):
        assert time.monotonic() < deadline, "the closed object's fd was never closed"
        time.sleep(0.01)
    assert server.stop() == 0
    assert provider.served == [11, 10]
    assert is_open(fast)  # held for the kernel (and the fd store) until exit
    os.close(fast)


def test_stop_finishes_taken_reads_and_fails_those_that_hang(device, tmp_path) -> None:
    daemon_end, kernel_end = device
    provider, completed = GatedProvider(), Completions()
    server = OnDemandServer(daemon_end.fileno(), provider, completed, workers=1)
    server.start()
    fd1, fd2 = temp_fd(tmp_path, "one"), temp_fd(tmp_path, "two")
    kernel_end.send(open_message(1, 1, fd1, b"erofs,v\0", b"a"))
    kernel_end.send(open_message(2, 2, fd2, b"erofs,v\0", b"b"))
    kernel_end.recv(64), kernel_end.recv(64)
    kernel_end.send(read_message(20, 1, 0, 4096))  # hangs (gate closed)
    assert provider.started.wait(5)
    kernel_end.send(read_message(21, 2, 0, 4096))  # queued behind it (one worker)
    deadline = time.monotonic() + 5
    while server.reads_in_flight != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.stop(timeout=0.5) == 2  # neither could finish: both failed, none left
    assert sorted(m for _, m in completed.done) == [20, 21]
    assert provider.served == []
    provider.gate.set()  # the late worker finishes without completing a second time
    time.sleep(0.2)
    assert sorted(m for _, m in completed.done) == [20, 21]
    os.close(fd1), os.close(fd2)


def test_failed_read_is_completed_without_data(device, tmp_path) -> None:
    daemon_end, kernel_end = device
    provider, completed = GatedProvider(), Completions()
    server = OnDemandServer(daemon_end.fileno(), provider, completed)
    fd = temp_fd(tmp_path, "obj")
    server.handle(open_message(1, 9, fd, b"erofs,v\0", b"bad"))
    kernel_end.recv(64)
    server.handle(read_message(5, 9, 0, 4096))
    assert completed.done == [(fd, 5)] and provider.served == []
    server.stop()
    os.close(fd)


def test_object_fds_go_to_the_fd_store_and_leave_it_on_close(
    device, tmp_path, notify: NotifySocket
) -> None:
    daemon_end, kernel_end = device
    server = OnDemandServer(daemon_end.fileno(), GatedProvider(), Completions(), store_fds=True)
    fd = temp_fd(tmp_path, "obj")
    server.handle(open_message(1, 5, fd, b"erofs,dom\0", b"sha256:ab"))
    assert kernel_end.recv(64) == b"copen 1,1048576"
    fields, fds = notify.receive()
    assert fields == {"FDSTORE": "1", "FDNAME": "cachefiles-obj-5-sha256%3Aab"}
    assert same_file(fds[0], fd)
    os.close(fds[0])
    server.handle(close_message(2, 5))
    assert notify.receive() == ({"FDSTOREREMOVE": "1", "FDNAME": fields["FDNAME"]}, [])
    assert not is_open(fd)
    server.stop()


def test_refused_objects_are_not_stored(device, tmp_path, notify: NotifySocket) -> None:
    daemon_end, kernel_end = device

    class Refuse(GatedProvider):
        def open(self, request: OpenRequest) -> int:
            return -errno.ENOENT

    server = OnDemandServer(daemon_end.fileno(), Refuse(), Completions(), store_fds=True)
    server.handle(open_message(1, 5, temp_fd(tmp_path, "obj"), b"erofs,d\0", b"b"))
    assert kernel_end.recv(64) == b"copen 1,-2"
    assert not notify.pending()
    server.stop()


def test_adopt_takes_back_known_objects_and_drops_the_rest(
    device, tmp_path, notify: NotifySocket
) -> None:
    daemon_end, _ = device
    provider, completed = GatedProvider(), Completions()
    server = OnDemandServer(daemon_end.fileno(), provider, completed, store_fds=True)
    kept, gone, odd = (temp_fd(tmp_path, n) for n in ("kept", "gone", "odd"))
    dropped = server.adopt({
        fdstore.object_fd_name(3, "blob"): kept,
        fdstore.object_fd_name(4, "gone"): gone,
        "something-else": odd,
    })  # fmt: skip
    assert sorted(dropped) == sorted([fdstore.object_fd_name(4, "gone"), "something-else"])
    assert server.objects() == {3: kept}
    assert sorted(provider.adopted) == [(3, "blob"), (4, "gone")]
    assert not is_open(gone) and not is_open(odd)
    removed = {notify.receive()[0]["FDNAME"] for _ in range(2)}
    assert removed == set(dropped)
    server.handle(read_message(7, 3, 0, 4096))  # served through the adopted fd
    assert completed.done == [(kept, 7)] and provider.served == [7]
    server.stop()
    os.close(kept)


# -- choosing the backend with an inherited device fd ---------------------------------------


def test_an_inherited_device_fd_is_used_without_binding_again(tmp_path: Path) -> None:
    paths = NodePaths(cachefiles="/dev/null", fs_ctl=str(tmp_path / "none"))
    fd = os.open("/dev/null", os.O_RDWR)
    choice = choose_backend("auto", str(tmp_path / "cache"), "t", paths, inherited_device=fd)
    assert (choice.name, choice.device_fd, choice.inherited) == ("fscache", fd, True)
    assert "taken back" in choice.reasons[0]
    assert not (tmp_path / "cache").exists()  # no dir/bind happened
    os.close(fd)


def test_a_wrong_or_unwanted_inherited_device_fd_is_closed(tmp_path: Path) -> None:
    missing = NodePaths(cachefiles=str(tmp_path / "nodev"), fuse=str(tmp_path / "nofuse"))
    other = os.open("/dev/zero", os.O_RDONLY)
    with pytest.raises(BackendUnavailableError):
        choose_backend("fscache", str(tmp_path / "c"), "t", missing, inherited_device=other)
    assert not is_open(other)
    paths = NodePaths(cachefiles="/dev/null", fuse=str(tmp_path / "nofuse"))
    null = os.open("/dev/null", os.O_RDWR)
    choice = choose_backend("none", str(tmp_path / "c"), "t", paths, inherited_device=null)
    assert choice.name == "none" and not is_open(null)
    assert "closed the inherited" in choice.reasons[0]


# -- the provider: verified chunks into the cache file ---------------------------------------


def test_a_cache_that_does_not_keep_writes_nothing_and_hands_out_whole_chunks(
    tmp_path: Path,
) -> None:
    chunk = 4096
    data = os.urandom(5 * chunk + 100)
    table = ChunkTable.from_chunks([data[i : i + chunk] for i in range(0, len(data), chunk)],
                                   chunk)  # fmt: skip
    spec = BlobSpec("sha256:" + "cd" * 32, len(data), table)

    class Source:
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def fetch(self, start: int, end: int, avoid: str = "") -> tuple[bytes, str]:
            self.calls.append((start, end))
            return data[start:end], "origin"

        def mark_bad(self, endpoint: str) -> None: ...

    cache = ChunkCache(tmp_path / "chunks", 1 << 30, Counters(), keep=False)
    source = Source()
    assert cache.read_span(spec, source, 5000, 10) == (chunk, data[chunk : 2 * chunk])
    # Sequential: the next read also brings the chunk after it (read-ahead), in the span.
    start, got = cache.read_span(spec, source, 2 * chunk + 1, 10)
    assert (start, got) == (2 * chunk, data[2 * chunk : 4 * chunk])
    # The read-ahead counts as read: the next kernel request starts after it.
    start, got = cache.read_span(spec, source, 4 * chunk, chunk)
    assert start == 4 * chunk and got == data[4 * chunk :]  # up to the short last chunk
    assert source.calls == [(chunk, 2 * chunk), (2 * chunk, 4 * chunk), (4 * chunk, len(data))]
    assert not (tmp_path / "chunks").exists() and cache.used == 0
    assert cache.read(spec, source, 10, 20) == data[10:30]


@pytest.fixture
def blob(images: dict[str, Layer], registry) -> tuple[Layer, bytes]:
    layer = images["multi"]
    url = f"http://{registry.address}/v2/{layer.repo}/blobs/{layer.digest}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return layer, resp.read()


@pytest.fixture
def backend(tmp_path: Path, blob, proxy: Proxy) -> Iterator[FscacheBackend]:
    layer, _ = blob
    blobs = BlobRegistry(tmp_path / "blobs.json")
    blobs.put(parse_blob_config(layer.config(proxy.address, fsid="img")))
    config = FscacheBackendConfig(tmp_path / "cachefiles", tmp_path / "apulld",
                                  FetchSettings(retries=1, timeout=5), threads=2)  # fmt: skip
    yield FscacheBackend(config, blobs)


class Kernel:
    """The kernel's side of one bound cache: sends messages, owns the cache files."""

    def __init__(self, tmp_path: Path, backend: FscacheBackend) -> None:
        self.tmp = tmp_path
        self.daemon_end, self.end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.end.settimeout(5)
        self.completed = Completions()
        self.server = OnDemandServer(self.daemon_end.fileno(), backend, self.completed)
        self.files: dict[int, Path] = {}
        self.msg = 0

    def open(self, object_id: int, volume: str, cookie: str) -> bytes:
        path = self.files[object_id] = self.tmp / f"cache-{object_id}"
        self.msg += 1
        self.server.handle(open_message(self.msg, object_id, direct_file(path),
                                        f"erofs,{volume}\0".encode(), cookie.encode()))  # fmt: skip
        return self.end.recv(64)

    def read(self, object_id: int, offset: int, length: int) -> None:
        self.msg += 1
        self.server.handle(read_message(self.msg, object_id, offset, length))
        assert self.completed.done[-1][1] == self.msg

    def cached(self, object_id: int) -> bytes:
        return self.files[object_id].read_bytes()

    def close(self) -> None:
        self.server.stop()
        self.daemon_end.close()
        self.end.close()


@pytest.fixture
def kernel(tmp_path: Path, backend: FscacheBackend) -> Iterator[Kernel]:
    k = Kernel(tmp_path, backend)
    yield k
    k.close()


def file_offset(layer: Layer, raw: bytes, name: str, at: int) -> int:
    """Where byte `at` of a file of the layer lies in the blob."""
    sample = layer.files[name][at : at + 64]
    offset = raw.find(sample)
    assert offset > 0
    return offset


def test_open_answers_the_blob_size_or_enoent(kernel: Kernel, blob, backend) -> None:
    layer, _ = blob
    assert kernel.open(1, "img", layer.blob_id) == f"copen 1,{layer.size}".encode()
    assert kernel.open(2, "other-volume", layer.blob_id) == b"copen 2,-2"
    assert kernel.open(3, "img", "no-such-blob") == b"copen 3,-2"
    serving = backend.describe()
    assert serving["open_objects"] == 1
    assert serving["objects"] == [{"object_id": 1, "blob_id": layer.blob_id}]
    assert serving["stats"]["open_refused"] == 2


def test_read_writes_verified_block_aligned_bytes(
    kernel: Kernel, blob, backend, proxy, tmp_path
) -> None:
    layer, raw = blob
    kernel.open(1, "img", layer.blob_id)
    offset = file_offset(layer, raw, "data/big", 1 << 20) // BLOCK * BLOCK
    kernel.read(1, offset, 3 * BLOCK)
    cached = kernel.cached(1)
    chunk = layer.chunk_size
    first = offset // chunk * chunk
    assert len(cached) % BLOCK == 0 and len(cached) >= offset + 3 * BLOCK
    assert cached[first:] == raw[first : len(cached)]  # whole chunks, exactly the blob's
    assert cached[:first] == bytes(first)  # nothing else written
    serving = backend.describe()
    stats = serving["stats"]
    assert stats["read_requests"] == 1 and stats["bytes_written"] == len(cached) - first
    # Per blob, what apull status reads for the open objects (not linked in the cache dir).
    assert serving["written_bytes"] == {layer.blob_id: len(cached) - first}
    assert proxy.bytes_of(layer.digest) == stats["bytes_fetched"] < layer.size // 4
    assert not (tmp_path / "apulld" / "chunks").exists()  # one copy: the cache file


def test_the_blob_tail_is_padded_to_a_block(kernel: Kernel, blob) -> None:
    layer, raw = blob
    kernel.open(1, "img", layer.blob_id)
    kernel.read(1, layer.size - BLOCK, BLOCK)
    cached = kernel.cached(1)
    assert len(cached) == -(-layer.size // BLOCK) * BLOCK
    assert cached[layer.size - BLOCK : layer.size] == raw[-BLOCK:]


def test_a_corrupt_range_is_fetched_again_or_never_written(
    kernel: Kernel, blob, backend, proxy
) -> None:
    layer, raw = blob
    kernel.open(1, "img", layer.blob_id)
    bad = file_offset(layer, raw, "data/big", 2 << 20)
    at = bad // BLOCK * BLOCK
    proxy.state.corrupt[layer.digest] = Corruption(bad, times=-1)
    kernel.read(1, at, BLOCK)  # completed (the kernel then fails the read: EIO) ...
    stats = backend.describe()["stats"]
    assert stats["read_errors"] == 1 and stats["verify_giveups"] == 1
    assert kernel.cached(1) == b""  # ... and not a byte was written
    time.sleep(2.1)  # past the failure memory
    proxy.state.corrupt[layer.digest] = Corruption(bad, times=1)
    kernel.read(1, at, BLOCK)
    cached = kernel.cached(1)
    assert cached[at : at + BLOCK] == raw[at : at + BLOCK]
    assert hashlib.sha256(cached[bad // layer.chunk_size * layer.chunk_size :]).digest() == (
        hashlib.sha256(raw[bad // layer.chunk_size * layer.chunk_size : len(cached)]).digest()
    )
    assert backend.describe()["stats"]["verify_failures"] >= 2


def test_serving_hooks_refuse_what_would_break_a_mount(kernel: Kernel, blob, backend) -> None:
    layer, _ = blob
    no_table = {k: v for k, v in layer.config("r.example", fsid="img").items()
                if not k.startswith("chunk")}  # fmt: skip
    with pytest.raises(ServingError) as raised:
        backend.check_put(parse_blob_config(no_table))
    assert raised.value.status == 400
    assert backend.added(parse_blob_config(layer.config("r", fsid="img", domain_id="d"))) == {
        "mount_options": f"fsid={layer.blob_id},domain_id=d"
    }
    assert backend.added(parse_blob_config(layer.config("r", fsid=layer.blob_id))) == {
        "mount_options": f"fsid={layer.blob_id}"
    }
    assert backend.added(parse_blob_config(layer.config("r", fsid="img"))) == {}
    backend.check_delete(layer.blob_id)  # not open: fine
    kernel.open(1, "img", layer.blob_id)
    with pytest.raises(ServingError) as raised:
        backend.check_delete(layer.blob_id)
    assert raised.value.status == 409
    other = dict(layer.config("r", fsid="img"), digest="sha256:" + "0" * 64)
    with pytest.raises(ServingError):
        backend.check_put(parse_blob_config(other))
    backend.check_put(parse_blob_config(layer.config("r", fsid="img")))  # same content: fine


def test_mmap_buffers_are_page_aligned() -> None:
    # write_blocks relies on it: O_DIRECT needs the buffer aligned, not only the offset.
    import ctypes

    with mmap.mmap(-1, 3 * BLOCK) as buffer:
        first = ctypes.c_char.from_buffer(buffer)
        address = ctypes.addressof(first)
        del first  # release the export before the mmap closes
        assert address % mmap.PAGESIZE == 0


# -- the unit: room in the fd store -----------------------------------------------------------


def render_unit(**variables: object) -> dict[str, str]:
    import jinja2

    template = Path(__file__).resolve().parents[2] / "roles/apull/templates/apulld.service.j2"
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined)
    text = env.from_string(template.read_text()).render(
        ansible_managed="test", apull_config_dir="/etc/apull", **variables
    )
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")


def test_the_unit_keeps_room_for_every_object_fd_and_only_keys_systemd_252_knows() -> None:
    keys = render_unit()
    assert int(keys["FileDescriptorStoreMax"]) >= 1024
    assert keys["KillMode"] == "process" and keys["Type"] == "notify"
    assert "FileDescriptorStorePreserve" not in keys  # systemd 252 (Debian 12) lacks it
    assert render_unit(apull_fdstore_preserve=True)["FileDescriptorStorePreserve"] == "yes"
