"""apulld: the on-demand message loop, with a SOCK_SEQPACKET pair standing in for the device.

Each datagram is one message, like a read() of /dev/cachefiles; the daemon's replies
(`copen ...`) come back as datagrams on the test's end.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from apull_node.daemon.cachefiles_device import (
    DeviceError,
    OnDemandServer,
    RefuseAllObjects,
    open_ondemand,
)
from apull_node.daemon.cachefiles_protocol import OpenRequest, ReadRequest


def open_message(msg_id: int, object_id: int, fd: int, volume: bytes, cookie: bytes) -> bytes:
    payload = struct.pack("<IIII", len(volume), len(cookie), fd, 0) + volume + cookie
    return struct.pack("<IIII", msg_id, 0, 16 + len(payload), object_id) + payload


def read_message(msg_id: int, object_id: int, offset: int, length: int) -> bytes:
    return struct.pack("<IIIIQQ", msg_id, 2, 32, object_id, offset, length)


def close_message(msg_id: int, object_id: int) -> bytes:
    return struct.pack("<IIII", msg_id, 1, 16, object_id)


@pytest.fixture
def device() -> Iterator[tuple[socket.socket, socket.socket]]:
    daemon_end, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel_end.settimeout(5)
    yield daemon_end, kernel_end
    daemon_end.close()
    kernel_end.close()


def anon_fd() -> int:
    """A real fd playing the kernel's anonymous cache-file fd."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as err:
        assert err.errno == errno.EBADF
        return False
    return True


class ServingProvider:
    """Serves every object at a fixed size and records what it was asked."""

    def __init__(self) -> None:
        self.reads: list[tuple[ReadRequest, int]] = []
        self.closed: list[int] = []

    def open(self, request: OpenRequest) -> int:
        return 8192

    def read(self, request: ReadRequest, anon_fd: int) -> None:
        self.reads.append((request, anon_fd))

    def close(self, object_id: int) -> None:
        self.closed.append(object_id)


def test_refused_open_replies_enoent_and_closes_the_anon_fd(device) -> None:
    daemon_end, kernel_end = device
    server = OnDemandServer(daemon_end.fileno(), RefuseAllObjects())
    fd = anon_fd()
    server.handle(open_message(7, 1, fd, b"erofs,img\0", b"img"))
    assert kernel_end.recv(1024) == b"copen 7,-2"
    assert not is_open(fd)
    assert server.open_objects == 0
    server.stop()


def test_served_object_read_completes_and_close_releases(device) -> None:
    daemon_end, kernel_end = device
    provider = ServingProvider()
    completed: list[tuple[int, int]] = []
    server = OnDemandServer(
        daemon_end.fileno(), provider, complete_read=lambda fd, msg: completed.append((fd, msg))
    )
    fd = anon_fd()
    server.handle(open_message(3, 5, fd, b"erofs,dom\0", b"blob"))
    assert kernel_end.recv(1024) == b"copen 3,8192"
    assert server.open_objects == 1

    server.handle(read_message(4, 5, 4096, 4096))
    assert provider.reads == [(ReadRequest(4, 5, 4096, 4096), fd)]
    assert completed == [(fd, 4)]

    server.handle(close_message(6, 5))
    assert provider.closed == [5]
    assert not is_open(fd)
    assert server.open_objects == 0
    server.stop()


def test_read_for_unknown_object_is_completed_through_any_held_fd(device) -> None:
    daemon_end, kernel_end = device
    completed: list[tuple[int, int]] = []
    server = OnDemandServer(
        daemon_end.fileno(),
        ServingProvider(),
        complete_read=lambda fd, msg: completed.append((fd, msg)),
    )
    # Nothing held: nothing to complete with (and no crash).
    server.handle(read_message(20, 99, 0, 4096))
    assert completed == []
    fd = anon_fd()
    server.handle(open_message(1, 2, fd, b"erofs,dom\0", b"blob"))
    kernel_end.recv(1024)
    server.handle(read_message(21, 99, 0, 4096))
    assert completed == [(fd, 21)]
    os.close(fd)
    server.stop()


def test_close_and_malformed_messages_for_unknown_objects_are_ignored(device) -> None:
    daemon_end, kernel_end = device
    server = OnDemandServer(daemon_end.fileno(), RefuseAllObjects())
    server.handle(close_message(1, 42))
    server.handle(b"\x01\x02")
    kernel_end.setblocking(False)
    with pytest.raises(BlockingIOError):
        kernel_end.recv(1024)
    server.stop()


def test_reader_thread_answers_and_stops(device) -> None:
    daemon_end, kernel_end = device
    server = OnDemandServer(daemon_end.fileno(), RefuseAllObjects())
    server.start()
    fds = [anon_fd() for _ in range(3)]
    for msg_id, fd in enumerate(fds):
        kernel_end.send(open_message(msg_id, msg_id + 1, fd, b"erofs,x\0", b"y"))
        assert kernel_end.recv(1024) == f"copen {msg_id},-2".encode()
    server.stop()
    assert not server._thread.is_alive()
    assert not any(is_open(fd) for fd in fds)
    # The device fd is left open (the kernel closes it when the process exits).
    assert is_open(daemon_end.fileno())


def test_open_ondemand_reports_missing_and_unusable_devices(tmp_path) -> None:
    with pytest.raises(DeviceError, match="does not exist"):
        open_ondemand(str(tmp_path), "t", str(tmp_path / "no-device"))
    with pytest.raises(DeviceError, match=r"cannot open .*EISDIR"):
        open_ondemand(str(tmp_path), "t", str(tmp_path))


def test_a_borrowed_fd_outlives_a_close_until_it_is_given_back(device) -> None:
    """Prewarm writes through an object's fd: a CLOSE meanwhile must not close the fd under
    it (its number could be reused by another file)."""
    daemon_end, kernel_end = device
    provider = ServingProvider()
    server = OnDemandServer(daemon_end.fileno(), provider)
    fd = anon_fd()
    server.handle(open_message(1, 9, fd, b"erofs,dom\0", b"blob"))
    kernel_end.recv(1024)
    with server.borrow(9) as borrowed:
        assert borrowed == fd
        server.handle(close_message(2, 9))
        assert provider.closed == [9]
        assert is_open(fd)
    assert not is_open(fd)
    with server.borrow(9) as gone:
        assert gone is None
    server.stop()
