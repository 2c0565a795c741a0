"""The FUSE kernel protocol (include/uapi/linux/fuse.h), as much as a read-only flat
directory of files needs. Little-endian, as on x86_64 and aarch64.

Every message from the kernel starts with a 40-byte header (length, opcode, unique id, node
id, caller's uid/gid/pid); every reply with a 16-byte header (length, -errno, unique id).
A reply with unique id 0 is a notification (the error field carries the notify code).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

#: The protocol major version we speak, and the minor we claim in the INIT reply.
MAJOR = 7
MINOR = 38
ROOT_ID = 1
#: Resent requests (FUSE_NOTIFY_RESEND, Linux >= 6.9) carry this bit in their unique id.
UNIQUE_RESEND = 1 << 63

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_ENTRY_OUT = struct.Struct("<QQQQII")
_ATTR_OUT = struct.Struct("<QII")
_INIT_IN = struct.Struct("<IIII")
_INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
_OPEN_OUT = struct.Struct("<QII")
_READ_IN = struct.Struct("<QQII")
_KSTATFS = struct.Struct("<QQQQQIIII6I")
_DIRENT = struct.Struct("<QQII")
_INVAL_ENTRY = struct.Struct("<QII")


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    OPEN = 14
    READ = 15
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    GETXATTR = 22
    LISTXATTR = 23
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    ACCESS = 34
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    READDIRPLUS = 44
    LSEEK = 46
    STATX = 52


class Notify(enum.IntEnum):
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    RESEND = 7


# INIT flags (the first 32 bits; flags2 holds bits 32..63).
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
#: flags2 bit: the kernel can resend requests a dead server had read (Linux >= 6.9).
HAS_RESEND2 = 1 << (39 - 32)

# OPEN reply flags.
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

S_IFDIR = 0o040000
S_IFREG = 0o100000
DT_DIR = 4
DT_REG = 8

#: Requests that get no reply at all.
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})


class ProtocolError(ValueError):
    """A message from the kernel is too short or inconsistent."""


@dataclass(frozen=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes

    @property
    def resent(self) -> bool:
        return bool(self.unique & UNIQUE_RESEND)


def parse_request(data: bytes) -> Request:
    if len(data) < IN_HEADER.size:
        raise ProtocolError(f"{len(data)} bytes: shorter than the request header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(data)
    if length != len(data):
        raise ProtocolError(f"header says {length} bytes, read {len(data)}")
    return Request(opcode, unique, nodeid, uid, gid, pid, data[IN_HEADER.size :])


@dataclass(frozen=True)
class Attr:
    ino: int
    size: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    blksize: int = 4096

    def pack(self) -> bytes:
        blocks = -(-self.size // 512)
        t = self.mtime
        return _ATTR.pack(
            self.ino, self.size, blocks, t, t, t, 0, 0, 0, self.mode, self.nlink,
            self.uid, self.gid, 0, self.blksize, 0,
        )  # fmt: skip


#: Reply payloads: writev() takes any buffer (a read's data is not copied into bytes).
Payload = Union[bytes, bytearray, memoryview]


def reply(unique: int, *payload: Payload) -> list[Payload]:
    """A successful reply as buffers for one writev()."""
    length = OUT_HEADER.size + sum(len(p) for p in payload)
    return [OUT_HEADER.pack(length, 0, unique), *payload]


def error_reply(unique: int, errno_value: int) -> list[bytes]:
    return [OUT_HEADER.pack(OUT_HEADER.size, -abs(errno_value), unique)]


def notification(code: Notify, payload: bytes = b"") -> list[bytes]:
    return [OUT_HEADER.pack(OUT_HEADER.size + len(payload), int(code), 0), payload]


def entry_out(attr: Attr, entry_ttl: float, attr_ttl: float) -> bytes:
    entry_s, entry_ns = _split_ttl(entry_ttl)
    attr_s, attr_ns = _split_ttl(attr_ttl)
    head = _ENTRY_OUT.pack(attr.ino, 0, entry_s, attr_s, entry_ns, attr_ns)
    return head + attr.pack()


def attr_out(attr: Attr, attr_ttl: float) -> bytes:
    attr_s, attr_ns = _split_ttl(attr_ttl)
    return _ATTR_OUT.pack(attr_s, attr_ns, 0) + attr.pack()


def _split_ttl(ttl: float) -> tuple[int, int]:
    seconds = int(ttl)
    return seconds, int((ttl - seconds) * 1e9)


@dataclass(frozen=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int
    flags2: int


def parse_init(body: bytes) -> InitIn:
    if len(body) < _INIT_IN.size:
        raise ProtocolError(f"INIT body of {len(body)} bytes")
    major, minor, readahead, flags = _INIT_IN.unpack_from(body)
    flags2 = struct.unpack_from("<I", body, 16)[0] if flags & INIT_EXT and len(body) >= 20 else 0
    return InitIn(major, minor, readahead, flags, flags2)


def init_out(
    kernel: InitIn, *, max_pages: int, max_background: int, max_write: int = 4096
) -> bytes:
    """Our INIT answer: the smaller minor, the flags both sides know, big reads."""
    wanted = ASYNC_READ | PARALLEL_DIROPS | MAX_PAGES
    flags = kernel.flags & wanted
    return _INIT_OUT.pack(
        MAJOR, min(kernel.minor, MINOR), kernel.max_readahead, flags,
        max_background, max(1, max_background * 3 // 4), max_write, 1,
        max_pages, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    )  # fmt: skip


def parse_read(body: bytes) -> tuple[int, int, int]:
    """(fh, offset, size) of READ and READDIR."""
    if len(body) < _READ_IN.size:
        raise ProtocolError(f"READ body of {len(body)} bytes")
    fh, offset, size, _flags = _READ_IN.unpack_from(body)
    return fh, offset, size


def parse_fh(body: bytes) -> int:
    """The file handle leading RELEASE / RELEASEDIR / FLUSH bodies."""
    if len(body) < 8:
        raise ProtocolError(f"body of {len(body)} bytes has no file handle")
    return int(struct.unpack_from("<Q", body)[0])


def parse_name(body: bytes) -> str:
    """LOOKUP's NUL-terminated name."""
    raw = body.split(b"\0", 1)[0]
    return raw.decode("utf-8", "surrogateescape")


def open_out(fh: int, flags: int) -> bytes:
    return _OPEN_OUT.pack(fh, flags, 0)


def statfs_out(blocks: int, files: int, bsize: int = 4096, namelen: int = 255) -> bytes:
    return _KSTATFS.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize, 0, 0, 0, 0, 0, 0, 0)


def dirents(entries: Iterable[tuple[int, int, str]], offset: int, size: int) -> bytes:
    """READDIR answer: entries (ino, dirent type, name) from index `offset`, at most `size`
    bytes. Each entry's `off` is the index of the next one (the kernel's next offset)."""
    out = bytearray()
    for index, (ino, kind, name) in enumerate(entries):
        if index < offset:
            continue
        raw = name.encode("utf-8", "surrogateescape")
        record = _DIRENT.pack(ino, index + 1, len(raw), kind) + raw
        record += b"\0" * (-len(record) % 8)
        if len(out) + len(record) > size:
            break
        out += record
    return bytes(out)


def inval_entry(parent: int, name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    return _INVAL_ENTRY.pack(parent, len(raw), 0) + raw + b"\0"
