"""/dev/cachefiles in on-demand mode: bind a cache, then answer the kernel's messages.

One reader thread polls the device: OPEN and CLOSE are answered in turn, READs go to a pool
of worker threads (one slow fetch does not hold up the others). What to serve comes from an
ObjectProvider (fscache_backend.py; RefuseAllObjects fails every OPEN). A READ is always
completed, whether or not the provider wrote the data: the kernel then finds the range
still missing and fails the read with EIO instead of waiting for ever.

The device fd and every open object's anonymous fd must outlive the process, else mounted
images stop reading (Linux 6.1 has no `restore`): with `store_fds` they are handed to
systemd's fd store (fdstore.py) as they are opened, removed when the kernel closes the
object, and taken back (`adopt`) by the next apulld. An anonymous fd is closed only when no
READ on it is in flight, so its number cannot be reused under a worker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from apull_node.daemon import fdstore
from apull_node.daemon.cachefiles_protocol import (
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


class ReadFailedError(Exception):
    """The provider cannot serve a READ and has logged why; it completes without data."""


class ObjectProvider(Protocol):
    """What the daemon serves."""

    def open(self, request: OpenRequest) -> int:
        """The object's byte size, or a negative errno to refuse it."""

    def adopt(self, object_id: int, name: fdstore.ObjectFdName) -> bool:
        """Serve an object an earlier apulld opened (its fd came from the fd store)."""

    def read(self, request: ReadRequest, anon_fd: int) -> None:
        """Write at least [offset, offset+length) of the object into `anon_fd` (pwrite,
        O_DIRECT rules); raise when it cannot (the READ then completes without data), best
        ReadFailedError after logging why."""

    def close(self, object_id: int) -> None:
        """The kernel dropped the object."""


class RefuseAllObjects:
    """Serves nothing: every OPEN fails with ENOENT."""

    def open(self, request: OpenRequest) -> int:
        return -errno.ENOENT

    def adopt(self, object_id: int, name: fdstore.ObjectFdName) -> bool:
        return False

    def read(self, request: ReadRequest, anon_fd: int) -> None:
        return None

    def close(self, object_id: int) -> None:
        return None


def _read_complete(anon_fd: int, msg_id: int) -> None:
    fcntl.ioctl(anon_fd, READ_COMPLETE_IOCTL, msg_id)


@dataclass
class _Object:
    object_id: int
    fd: int
    fd_name: str
    busy: int = 0  # READs in flight on fd
    closed: bool = False  # the kernel sent CLOSE (or a new OPEN replaced it)


@dataclass(frozen=True)
class _Job:
    request: ReadRequest
    obj: _Object
    serve: bool  # False: only complete it (READ for an object we do not hold)


class OnDemandServer:
    """Reads messages from the bound device fd and answers each one.

    workers=0 serves READs in the reader thread (and in handle(), for tests)."""

    def __init__(
        self,
        device_fd: int,
        provider: ObjectProvider,
        complete_read: Callable[[int, int], None] = _read_complete,
        workers: int = 0,
        store_fds: bool = False,
    ) -> None:
        self._fd = device_fd
        self._provider = provider
        self._complete_read = complete_read
        self._store_fds = store_fds
        self._lock = threading.Lock()
        self._objects: dict[int, _Object] = {}
        self._inflight: dict[int, _Job] = {}  # msg_id -> READ taken from the device
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="cachefiles", daemon=True)
        self._workers = [
            threading.Thread(target=self._work, name=f"cachefiles-{n}", daemon=True)
            for n in range(workers)
        ]

    @property
    def open_objects(self) -> int:
        with self._lock:
            return len(self._objects)

    @property
    def reads_in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    @contextlib.contextmanager
    def borrow(self, object_id: int) -> Iterator[int | None]:
        """The object's anonymous fd, kept open while in use (None: the object is not
        open): a CLOSE meanwhile closes it only after, so its number is never reused under
        the borrower."""
        with self._lock:
            obj = self._objects.get(object_id)
            if obj is not None and obj.closed:
                obj = None
            if obj is not None:
                obj.busy += 1
        try:
            yield obj.fd if obj is not None else None
        finally:
            if obj is not None:
                self._release(obj)

    def objects(self) -> dict[int, int]:
        """object_id -> anonymous fd of each open object."""
        with self._lock:
            return {o.object_id: o.fd for o in self._objects.values()}

    def adopt(self, inherited: dict[str, int]) -> list[str]:
        """Take back the objects of an earlier apulld from `inherited` (fd store names);
        fds no longer wanted are closed and dropped from the store. Call before start().
        Returns the names not taken."""
        dropped = []
        for name, fd in sorted(inherited.items()):
            parsed = fdstore.parse_object_fd_name(name)
            wanted = parsed is not None and parsed.object_id not in self._objects
            if parsed is not None and wanted and self._provider.adopt(parsed.object_id, parsed):
                self._objects[parsed.object_id] = _Object(parsed.object_id, fd, name)
                continue
            dropped.append(name)
            with contextlib.suppress(OSError):
                os.close(fd)
            if self._store_fds:
                fdstore.remove(name)
        return dropped

    def restore(self) -> bool:
        """Ask the kernel to send again the READs an earlier daemon took but never answered
        (`restore`: kernels with on-demand failover, Debian's 6.1 too; False without)."""
        try:
            os.write(self._fd, b"restore")
        except OSError as err:
            log.info(
                "restore not accepted (%s): this kernel has no on-demand failover; READs a "
                "crashed apulld had taken stay unanswered",
                _errno_name(err),
            )
            return False
        log.info("restore sent: READs the previous apulld took but did not answer come again")
        return True

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> int:
        """Take no more messages, finish the READs already taken (those still running after
        `timeout` are completed without data: EIO rather than a reader hanging for ever).
        The device and anonymous fds stay open (the fd store or the process exit has them).
        Returns how many READs had to be failed."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        if self._thread.ident is not None:
            self._thread.join(timeout)
        for _ in self._workers:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.ident is not None:
                worker.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            late = list(self._inflight.values())
            self._inflight.clear()
        for job in late:
            log.error("READ %d (%s) still running at exit: failing it", job.request.msg_id,
                      job.request)  # fmt: skip
            self._complete(job)
        os.close(self._wake_r)
        os.close(self._wake_w)
        return len(late)

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
        name = fdstore.object_fd_name(request.object_id, request.cookie)
        with self._lock:
            stale = self._objects.pop(request.object_id, None)
        if stale is not None:
            self._drop(stale)
        if size >= 0 and self._store_fds and not fdstore.store(request.fd, name):
            log.warning("object %d (%s): the fd store did not take its fd; a restart will "
                        "strand it", request.object_id, request.cookie)  # fmt: skip
        try:
            os.write(self._fd, copen_command(request.msg_id, size))
        except OSError as err:
            log.error("copen %d,%d failed: %s", request.msg_id, size, err)
            if size >= 0 and self._store_fds:
                fdstore.remove(name)
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
        with self._lock:
            self._objects[request.object_id] = _Object(request.object_id, request.fd, name)

    def _on_read(self, request: ReadRequest) -> None:
        with self._lock:
            obj = self._objects.get(request.object_id)
            serve = obj is not None
            if obj is None:
                # The kernel completes a READ by msg_id through any anonymous fd of this cache.
                obj = next(iter(self._objects.values()), None)
            job = None if obj is None else _Job(request, obj, serve)
            if job is not None:
                job.obj.busy += 1
                self._inflight[request.msg_id] = job
        if not serve:
            log.warning("READ for unknown object %d", request.object_id)
        if job is None:
            log.error(
                "cannot complete READ %d: no anonymous fd is held; the reader waits "
                "until the device is closed",
                request.msg_id,
            )
            return
        if self._workers:
            self._jobs.put(job)
        else:
            self._serve(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._serve(job)

    def _serve(self, job: _Job) -> None:
        if job.serve:
            try:
                self._provider.read(job.request, job.obj.fd)
            except ReadFailedError:
                pass
            except Exception:
                log.exception("serving %s failed", job.request)
        with self._lock:
            mine = self._inflight.pop(job.request.msg_id, None) is job
        if mine:
            self._complete(job)
        self._release(job.obj)

    def _complete(self, job: _Job) -> None:
        try:
            self._complete_read(job.obj.fd, job.request.msg_id)
        except OSError as err:
            log.error("completing READ %d failed: %s", job.request.msg_id, err)

    def _release(self, obj: _Object) -> None:
        with self._lock:
            obj.busy -= 1
            close = obj.closed and obj.busy == 0
        if close:
            with contextlib.suppress(OSError):
                os.close(obj.fd)

    def _drop(self, obj: _Object) -> None:
        """Forget an object: its fd is closed now, or by the last READ still using it."""
        with self._lock:
            obj.closed = True
            close = obj.busy == 0
        if close:
            with contextlib.suppress(OSError):
                os.close(obj.fd)
        if self._store_fds:
            fdstore.remove(obj.fd_name)

    def _on_close(self, request: CloseRequest) -> None:
        with self._lock:
            obj = self._objects.pop(request.object_id, None)
        if obj is None:
            log.debug("CLOSE for unknown object %d ignored", request.object_id)
            return
        self._drop(obj)
        self._provider.close(request.object_id)
