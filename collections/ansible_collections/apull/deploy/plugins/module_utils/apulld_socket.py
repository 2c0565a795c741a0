# Copyright: apull-deploy contributors
# Apache License 2.0
"""apulld's ping over its unix socket, for the node-side modules (node_facts, stack_health):
one small HTTP/1.0 exchange on a socket of its own, nothing patched in http.client."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import socket

PING = b"PUT /v1.0/apulld/ping HTTP/1.0\r\nHost: apulld\r\nContent-Length: 0\r\n\r\n"


def ping(address, timeout=5.0):
    """(apulld's answer {"backend", "reasons", ...}, None) or (None, why it did not answer)."""
    if not os.path.exists(address):
        return None, "%s does not exist" % address
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    data = b""
    try:
        sock.connect(address)
        sock.sendall(PING)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (IOError, OSError) as exc:
        return None, "%s: %s" % (address, getattr(exc, "strerror", None) or exc)
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode("latin-1")
    if not status.startswith("HTTP/1.") or " 200 " not in status + " ":
        return None, "%s answered %r" % (address, status or "nothing")
    try:
        answer = json.loads(body.decode("utf-8"))
    except ValueError:
        return None, "%s answered 200 without JSON" % address
    if not isinstance(answer, dict) or "backend" not in answer:
        return None, "%s answered 200 without a backend" % address
    return answer, None
