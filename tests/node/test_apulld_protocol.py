"""apulld: the cachefiles on-demand codec, on synthetic messages built from the uapi layout."""

from __future__ import annotations

import re
import struct

import pytest

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


def open_message(msg_id: int, object_id: int, fd: int, volume: bytes, cookie: bytes) -> bytes:
    payload = struct.pack("<IIII", len(volume), len(cookie), fd, 0) + volume + cookie
    return struct.pack("<IIII", msg_id, 0, 16 + len(payload), object_id) + payload


def read_message(msg_id: int, object_id: int, offset: int, length: int) -> bytes:
    return struct.pack("<IIIIQQ", msg_id, 2, 32, object_id, offset, length)


def test_open_decodes_keys_fd_and_ids() -> None:
    data = open_message(7, 3, 12, b"erofs,domain-1\0", b"sha256-blob")
    message = decode_message(data)
    assert message == OpenRequest(
        msg_id=7,
        object_id=3,
        fd=12,
        flags=0,
        volume_key="erofs,domain-1",
        cookie_key=b"sha256-blob",
    )
    assert isinstance(message, OpenRequest)
    assert message.volume == "domain-1"
    assert message.cookie == "sha256-blob"


def test_open_volume_without_erofs_prefix_is_kept_whole() -> None:
    message = decode_message(open_message(1, 1, 5, b"other,key\0", b"c"))
    assert isinstance(message, OpenRequest)
    assert message.volume == "other,key"


def test_read_and_close_decode() -> None:
    assert decode_message(read_message(9, 4, 8192, 4096)) == ReadRequest(9, 4, 8192, 4096)
    big = read_message(10, 4, 1 << 40, 1 << 20)
    assert decode_message(big) == ReadRequest(10, 4, 1 << 40, 1 << 20)
    close = struct.pack("<IIII", 11, 1, 16, 4)
    assert decode_message(close) == CloseRequest(11, 4)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"\0" * 15, "shorter than the 16-byte header"),
        (struct.pack("<IIII", 1, 1, 20, 1), "header says 20 bytes, read returned 16"),
        (struct.pack("<IIII", 1, 9, 16, 1), "unknown opcode 9"),
        (struct.pack("<IIII", 1, 1, 20, 1) + b"abcd", "CLOSE of 20 bytes"),
        (struct.pack("<IIIIQ", 1, 2, 24, 1, 0), "READ of 24 bytes"),
        (struct.pack("<IIII", 1, 0, 24, 1) + b"\0" * 8, "shorter than its 32-byte head"),
        (
            struct.pack("<IIIIIIII", 1, 0, 36, 1, 3, 3, 5, 0) + b"ab\0c",
            "keys (3 + 3 bytes) do not fill the 4 bytes",
        ),
    ],
)
def test_malformed_messages_are_refused(data: bytes, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(complaint)):
        decode_message(data)


def test_copen_replies() -> None:
    assert copen_command(5, 1048576) == b"copen 5,1048576"
    assert copen_command(5, -2) == b"copen 5,-2"
    assert copen_command(0, 0) == b"copen 0,0"
    with pytest.raises(ValueError, match="errno"):
        copen_command(5, -5000)


def test_read_complete_ioctl_number_matches_uapi() -> None:
    # _IOW(0x98, 1, int) on x86_64 and aarch64.
    assert READ_COMPLETE_IOCTL == 0x40049801
    assert MSG_MAX_SIZE == 1024


def test_session_commands_bind_ondemand_last() -> None:
    assert session_commands("/var/lib/c", "apull") == [
        b"dir /var/lib/c",
        b"tag apull",
        b"bind ondemand",
    ]
    with pytest.raises(ValueError, match="cache dir"):
        session_commands("/var/lib/c\nbind", "apull")
    with pytest.raises(ValueError, match="whitespace"):
        session_commands("/var/lib/c", "two words")
    with pytest.raises(ValueError, match="tag"):
        session_commands("/var/lib/c", "")
