"""/dev/cachefiles in on-demand mode: bind a cache, then answer the kernel's messages.

One reader thread polls the device and handles each message in turn. What to serve comes
from an ObjectProvider; until lazy serving exists the daemon uses RefuseAllObjects, which
fails every OPEN (so mounts fail at once instead of hanging). The device fd stays open for
the life of the process: closing it would strand every mounted image.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

from apull.daemon.cachefiles_protocol import (
    MSG_MAX_SIZE,
    READ_COMPLETE_IOCTL,
    CloseRequest,
    OpenRequest,
    ProtocolError,
    ReadRequest,
    copen_command,
    decode_message,
    session_commands,
)

DEVICE_PATH = "/dev/cachefiles"
log = logging.getLogger("apulld.cachefiles")


class DeviceError(Exception):
    """The device cannot be opened or bound; the message says which step failed and why."""


def _errno_name(err: OSError) -> str:
    return errno.errorcode.get(err.errno or 0, str(err.errno))


def open_ondemand(cache_dir: str, tag: str, device: str = DEVICE_PATH) -> int:
    """Open `device` and bind `cache_dir` as an on-demand cache; return the device fd."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise DeviceError(f"{device} does not exist (modprobe cachefiles)") from err
    except OSError as err:
        if err.errno == errno.EBUSY:
            why = "another process holds it (cachefilesd or another apulld); only one may"
        elif err.errno in (errno.EPERM, errno.EACCES):
            why = "opening it needs root (CAP_SYS_ADMIN)"
        else:
            why = err.strerror or "open failed"
        raise DeviceError(f"cannot open {device} ({_errno_name(err)}): {why}") from err
    try:
        for command in session_commands(cache_dir, tag):
            try:
                os.write(fd, command)
            except OSError as err:
                raise DeviceError(_explain_command(command.decode(), cache_dir, err)) from err
    except BaseException:
        os.close(fd)
        raise
    return fd


def _explain_command(command: str, cache_dir: str, err: OSError) -> str:
    name = _errno_name(err)
    if command == "bind ondemand":
        if err.errno == errno.EINVAL:
            return (
                "bind ondemand rejected (EINVAL): this kernel's cachefiles has no on-demand "
                "mode (CONFIG_CACHEFILES_ONDEMAND)"
            )
        if err.errno == errno.EOPNOTSUPP:
            return (
                f"bind ondemand rejected (EOPNOTSUPP): cachefiles cannot use {cache_dir} "
                "(its filesystem needs xattrs and sync) or lacks on-demand mode; see dmesg"
            )
        if err.errno == errno.ENOENT:
            return f"bind ondemand failed (ENOENT): {cache_dir} does not exist"
    return f"{command!r} rejected ({name}): {err.strerror}; see dmesg"


class ObjectProvider(Protocol):
    """What the daemon serves. Lazy serving (the next step) plugs in here."""

    def open(self, request: OpenRequest) -> int:
        """The object's byte size, or a negative errno to refuse it."""

    def read(self, request: ReadRequest, anon_fd: int) -> None:
        """Write [offset, offset+length) of the object into `anon_fd` (pwrite, O_DIRECT rules)."""

    def close(self, object_id: int) -> None:
        """The kernel dropped the object."""


class RefuseAllObjects:
    """No blob can be served yet: every OPEN fails with ENOENT."""

    def open(self, request: OpenRequest) -> int:
        return -errno.ENOENT

    def read(self, request: ReadRequest, anon_fd: int) -> None:
        return None

    def close(self, object_id: int) -> None:
        return None


def _read_complete(anon_fd: int, msg_id: int) -> None:
    fcntl.ioctl(anon_fd, READ_COMPLETE_IOCTL, msg_id)


class OnDemandServer:
    """Reads messages from the bound device fd and answers each one."""

    def __init__(
        self,
        device_fd: int,
        provider: ObjectProvider,
        complete_read: Callable[[int, int], None] = _read_complete,
    ) -> None:
        self._fd = device_fd
        self._provider = provider
        self._complete_read = complete_read
        # object_id -> the anonymous fd of its cache file, for objects we opened.
        self._objects: dict[int, int] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="cachefiles", daemon=True)

    @property
    def open_objects(self) -> int:
        return len(self._objects)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the reader thread; the device fd is left open for the kernel to close at exit."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        if self._thread.ident is not None:
            self._thread.join(timeout)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            if events.get(self._fd, 0) & (select.POLLERR | select.POLLNVAL):
                log.error("device fd reports an error; reader stops")
                return
            try:
                data = os.read(self._fd, MSG_MAX_SIZE)
            except BlockingIOError:
                continue
            except OSError as err:
                log.error("read failed: %s", err)
                time.sleep(0.1)
                continue
            if not data:
                # Nothing pending after all (old kernels, or READs of a reopening object).
                time.sleep(0.01)
                continue
            self.handle(data)

    def handle(self, data: bytes) -> None:
        """Answer one message as read from the device."""
        try:
            message = decode_message(data)
        except ProtocolError as err:
            log.warning("dropping malformed message: %s", err)
            return
        log.debug("%s", message)
        if isinstance(message, OpenRequest):
            self._on_open(message)
        elif isinstance(message, ReadRequest):
            self._on_read(message)
        else:
            self._on_close(message)

    def _on_open(self, request: OpenRequest) -> None:
        try:
            size = self._provider.open(request)
        except Exception:
            log.exception("opening %s/%s failed", request.volume, request.cookie)
            size = -errno.EIO
        try:
            os.write(self._fd, copen_command(request.msg_id, size))
        except OSError as err:
            log.error("copen %d,%d failed: %s", request.msg_id, size, err)
            size = min(size, -errno.EIO)
        if size < 0:
            log.info(
                "refused object %s/%s (%s)",
                request.volume,
                request.cookie,
                errno.errorcode.get(-size, size),
            )
            with contextlib.suppress(OSError):
                os.close(request.fd)
            return
        stale = self._objects.pop(request.object_id, None)
        if stale is not None and stale != request.fd:
            with contextlib.suppress(OSError):
                os.close(stale)
        self._objects[request.object_id] = request.fd

    def _on_read(self, request: ReadRequest) -> None:
        anon_fd = self._objects.get(request.object_id)
        if anon_fd is not None:
            try:
                self._provider.read(request, anon_fd)
            except Exception:
                log.exception("serving %s failed", request)
        else:
            # The kernel completes a READ by msg_id through any anonymous fd of this cache.
            anon_fd = next(iter(self._objects.values()), None)
            log.warning("READ for unknown object %d", request.object_id)
        if anon_fd is None:
            log.error(
                "cannot complete READ %d: no anonymous fd is held; the reader waits "
                "until the device is closed",
                request.msg_id,
            )
            return
        try:
            self._complete_read(anon_fd, request.msg_id)
        except OSError as err:
            log.error("completing READ %d failed: %s", request.msg_id, err)

    def _on_close(self, request: CloseRequest) -> None:
        anon_fd = self._objects.pop(request.object_id, None)
        if anon_fd is None:
            log.debug("CLOSE for unknown object %d ignored", request.object_id)
            return
        with contextlib.suppress(OSError):
            os.close(anon_fd)
        self._provider.close(request.object_id)
