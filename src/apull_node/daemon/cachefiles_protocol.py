"""The cachefiles on-demand wire format (include/uapi/linux/cachefiles.h), without any I/O.

Every read() of /dev/cachefiles returns one message: a 16-byte header (msg_id, opcode, len,
object_id; little-endian u32) and an opcode-specific payload. OPEN is answered with the text
command `copen <msg_id>,<size or -errno>`; READ with the READ_COMPLETE ioctl on the object's
anonymous fd; CLOSE needs no answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

OP_OPEN = 0
OP_CLOSE = 1
OP_READ = 2
OPCODE_NAMES = {OP_OPEN: "OPEN", OP_CLOSE: "CLOSE", OP_READ: "READ"}

# CACHEFILES_MSG_MAX_SIZE: a read buffer of this size always holds one whole message.
MSG_MAX_SIZE = 1024

_HEADER = struct.Struct("<IIII")  # msg_id, opcode, len, object_id
_OPEN = struct.Struct("<IIII")  # volume_key_size, cookie_key_size, fd, flags
_READ = struct.Struct("<QQ")  # off, len

# The highest errno the kernel takes as an error in `copen` (IS_ERR_VALUE: -4095..-1).
_MAX_ERRNO = 4095


def _iow(kind: int, number: int, size: int) -> int:
    """Linux's _IOW(): direction write (1) in bits 30-31, argument size, type, number."""
    return (1 << 30) | (size << 16) | (kind << 8) | number


# _IOW(0x98, 1, int): the msg_id of the READ being completed is passed by value.
READ_COMPLETE_IOCTL = _iow(0x98, 1, 4)


class ProtocolError(ValueError):
    """Bytes that are not a well-formed on-demand message."""


@dataclass(frozen=True)
class OpenRequest:
    """The kernel wants an object (a bootstrap or a data blob); `fd` is its anonymous fd."""

    msg_id: int
    object_id: int
    fd: int
    flags: int
    # `erofs,<domain_id or fsid>`, NUL stripped.
    volume_key: str
    # The blob id (or the fsid for a bootstrap); binary in the kernel, text for EROFS.
    cookie_key: bytes

    @property
    def volume(self) -> str:
        """The domain_id or fsid the object belongs to (the volume key without `erofs,`)."""
        prefix, sep, rest = self.volume_key.partition(",")
        return rest if sep and prefix == "erofs" else self.volume_key

    @property
    def cookie(self) -> str:
        return self.cookie_key.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class CloseRequest:
    """The kernel dropped the object: close the anonymous fds held for it. No reply."""

    msg_id: int
    object_id: int


@dataclass(frozen=True)
class ReadRequest:
    """The kernel needs bytes [offset, offset+length) of the object in its cache file."""

    msg_id: int
    object_id: int
    offset: int
    length: int


Message = Union[OpenRequest, CloseRequest, ReadRequest]


def decode_message(data: bytes) -> Message:
    """Parse one message as read() returned it; ProtocolError says what is wrong."""
    if len(data) < _HEADER.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than the 16-byte header")
    msg_id, opcode, length, object_id = _HEADER.unpack_from(data)
    if length != len(data):
        raise ProtocolError(f"header says {length} bytes, read returned {len(data)}")
    if opcode == OP_OPEN:
        return _decode_open(data, msg_id, object_id)
    if opcode == OP_CLOSE:
        if length != _HEADER.size:
            raise ProtocolError(f"CLOSE of {length} bytes (expected {_HEADER.size})")
        return CloseRequest(msg_id, object_id)
    if opcode == OP_READ:
        if length != _HEADER.size + _READ.size:
            raise ProtocolError(f"READ of {length} bytes (expected {_HEADER.size + _READ.size})")
        offset, size = _READ.unpack_from(data, _HEADER.size)
        return ReadRequest(msg_id, object_id, offset, size)
    raise ProtocolError(f"unknown opcode {opcode} (msg_id {msg_id})")


def _decode_open(data: bytes, msg_id: int, object_id: int) -> OpenRequest:
    start = _HEADER.size + _OPEN.size
    if len(data) < start:
        raise ProtocolError(f"OPEN of {len(data)} bytes is shorter than its {start}-byte head")
    volume_size, cookie_size, fd, flags = _OPEN.unpack_from(data, _HEADER.size)
    if start + volume_size + cookie_size != len(data):
        raise ProtocolError(
            f"OPEN keys ({volume_size} + {cookie_size} bytes) do not fill the "
            f"{len(data) - start} bytes after the head"
        )
    volume_raw = data[start : start + volume_size]
    cookie_key = data[start + volume_size :]
    volume_key = volume_raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return OpenRequest(msg_id, object_id, fd, flags, volume_key, cookie_key)


def copen_command(msg_id: int, size: int) -> bytes:
    """The reply to an OPEN: the object's size, or a negative errno to fail the open."""
    if size < -_MAX_ERRNO:
        raise ValueError(f"copen size {size}: a negative size must be an errno (-1..-4095)")
    return f"copen {msg_id},{size}".encode()


def session_commands(cache_dir: str, tag: str) -> list[bytes]:
    """The commands that bind an on-demand cache, one per write(), in order."""
    for name, value in (("cache dir", cache_dir), ("tag", tag)):
        if not value or any(c in value for c in "\0\n"):
            raise ValueError(f"{name} {value!r} cannot be sent to /dev/cachefiles")
    if any(c.isspace() for c in tag):
        raise ValueError(f"tag {tag!r} must not contain whitespace")
    return [f"dir {cache_dir}".encode(), f"tag {tag}".encode(), b"bind ondemand"]
