"""A FUSE session on an open /dev/fuse fd: worker threads read requests and answer them from
a `Filesystem` (read-only: lookups, attributes, directory listing, open, read, release).

A session can start on a fresh mount (the kernel's first message is INIT) or resume a
connection an earlier apulld set up (`resumed=True`: no INIT comes; the kernel is asked with
FUSE_NOTIFY_RESEND to send again every request the earlier process had read but not
answered). Stopping finishes the requests in hand and leaves the connection alone, so a
successor holding the same fd can carry on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import threading
from collections.abc import Sequence
from typing import Protocol

from apull_node.daemon import fuse_protocol as fp

log = logging.getLogger("apulld.fuse")
#: Larger than any request we can get (names, xattr values of 64 KiB).
READ_BUFFER = 132 * 1024
MAX_PAGES = 256  # 1 MiB reads


class FuseError(Exception):
    """Answer the request with this errno."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(message or os.strerror(errno_value))
        self.errno = errno_value


class Filesystem(Protocol):
    entry_ttl: float
    attr_ttl: float

    def lookup(self, parent: int, name: str) -> fp.Attr: ...

    def getattr(self, nodeid: int) -> fp.Attr: ...

    def open(self, nodeid: int, flags: int) -> tuple[int, int]:
        """(file handle, FOPEN_* flags)."""

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> fp.Payload: ...

    def release(self, nodeid: int, fh: int) -> None: ...

    def readdir(self, nodeid: int) -> list[tuple[int, int, str]]:
        """(ino, DT_* type, name) of every entry, in a stable order."""

    def statfs(self) -> tuple[int, int]:
        """(blocks, files)."""


class FuseSession:
    def __init__(self, fd: int, fs: Filesystem, *, threads: int = 4, resumed: bool = False) -> None:
        self.fd = fd
        self.fs = fs
        self.resumed = resumed
        self.initialized = threading.Event()
        self.disconnected = threading.Event()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._threads = [
            threading.Thread(target=self._worker, name=f"fuse-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        if resumed:
            self.initialized.set()

    def start(self) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        for thread in self._threads:
            thread.start()
        if self.resumed:
            self.resend()

    def resend(self) -> bool:
        """Ask the kernel to queue again the requests an earlier server read but did not
        answer (Linux >= 6.9); without it their callers would wait for ever."""
        try:
            os.writev(self.fd, fp.notification(fp.Notify.RESEND))
        except OSError as err:
            log.warning(
                "the kernel cannot resend requests the previous apulld had read (%s): "
                "reads it was serving when it stopped stay blocked",
                err,
            )
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests; wait for the ones being answered. The fd stays open."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def notify_inval_entry(self, parent: int, name: str) -> None:
        """Make the kernel forget a cached name (a blob removed or replaced)."""
        try:
            os.writev(self.fd, fp.notification(fp.Notify.INVAL_ENTRY, fp.inval_entry(parent, name)))
        except OSError as err:
            if err.errno != errno.ENOENT:  # not cached: nothing to forget
                log.debug("inval entry %s: %s", name, err)

    # -- the loop ------------------------------------------------------------------------

    def _worker(self) -> None:
        # Each worker waits in its own epoll with EPOLLEXCLUSIVE: a request wakes one idle
        # worker, not all of them (with poll() every idle worker woke and all but one found
        # nothing to read: 11400 context switches per cold 256 MiB read, now 4400).
        with select.epoll() as poller:
            poller.register(self.fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            poller.register(self._wake_r, select.EPOLLIN)
            self._serve(poller)

    def _serve(self, poller: select.epoll) -> None:
        while not self._stopping.is_set():
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            if events.get(self.fd, 0) & (select.EPOLLERR | select.EPOLLHUP):
                self._lost("the kernel closed the connection (unmounted or aborted)")
                return
            try:
                data = os.read(self.fd, READ_BUFFER)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                if err.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if err.errno == errno.ENODEV:
                    self._lost("unmounted")
                    return
                log.error("reading /dev/fuse failed: %s", err)
                continue
            self._handle(data)

    def _lost(self, why: str) -> None:
        if not self.disconnected.is_set():
            log.warning("FUSE connection lost: %s", why)
        self.disconnected.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _handle(self, data: bytes) -> None:
        try:
            request = fp.parse_request(data)
        except fp.ProtocolError as err:
            log.warning("dropping malformed request: %s", err)
            return
        if request.opcode in fp.NO_REPLY:
            return
        answer: Sequence[fp.Payload]
        try:
            answer = self._dispatch(request)
        except FuseError as err:
            answer = fp.error_reply(request.unique, err.errno)
        except fp.ProtocolError as err:
            log.warning("request %d: %s", request.opcode, err)
            answer = fp.error_reply(request.unique, errno.EINVAL)
        except Exception:
            log.exception("request %d on node %d failed", request.opcode, request.nodeid)
            answer = fp.error_reply(request.unique, errno.EIO)
        try:
            os.writev(self.fd, answer)
        except OSError as err:
            if err.errno == errno.ENODEV:
                self._lost("unmounted")
            elif err.errno != errno.ENOENT:  # ENOENT: the caller gave up (interrupted)
                log.error("answering request %d failed: %s", request.opcode, err)

    def _dispatch(self, request: fp.Request) -> list[fp.Payload]:
        op, unique, node, fs = request.opcode, request.unique, request.nodeid, self.fs
        if op == fp.Op.INIT:
            kernel = fp.parse_init(request.body)
            if kernel.major != fp.MAJOR:
                raise FuseError(errno.EPROTO, f"kernel FUSE protocol {kernel.major}")
            out = fp.init_out(kernel, max_pages=MAX_PAGES, max_background=16)
            self.initialized.set()
            log.info(
                "FUSE protocol %d.%d (kernel %d.%d)",
                fp.MAJOR, min(kernel.minor, fp.MINOR), kernel.major, kernel.minor,
            )  # fmt: skip
            return fp.reply(unique, out)
        if op == fp.Op.LOOKUP:
            attr = fs.lookup(node, fp.parse_name(request.body))
            return fp.reply(unique, fp.entry_out(attr, fs.entry_ttl, fs.attr_ttl))
        if op == fp.Op.GETATTR:
            return fp.reply(unique, fp.attr_out(fs.getattr(node), fs.attr_ttl))
        if op == fp.Op.OPEN:
            open_flags = int.from_bytes(request.body[:4], "little") if request.body else 0
            fh, flags = fs.open(node, open_flags)
            return fp.reply(unique, fp.open_out(fh, flags))
        if op == fp.Op.READ:
            fh, offset, size = fp.parse_read(request.body)
            return fp.reply(unique, fs.read(node, fh, offset, size))
        if op == fp.Op.RELEASE:
            fs.release(node, fp.parse_fh(request.body))
            return fp.reply(unique)
        if op in (fp.Op.FLUSH, fp.Op.RELEASEDIR, fp.Op.DESTROY):
            return fp.reply(unique)
        if op == fp.Op.OPENDIR:
            fs.getattr(node)
            return fp.reply(unique, fp.open_out(0, 0))
        if op == fp.Op.READDIR:
            _fh, offset, size = fp.parse_read(request.body)
            return fp.reply(unique, fp.dirents(fs.readdir(node), offset, size))
        if op == fp.Op.STATFS:
            blocks, files = fs.statfs()
            return fp.reply(unique, fp.statfs_out(blocks, files))
        if op == fp.Op.SETATTR:
            raise FuseError(errno.EROFS)
        raise FuseError(errno.ENOSYS)
