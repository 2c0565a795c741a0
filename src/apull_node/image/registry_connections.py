"""Connections to registries, shared by every session of a process (standard library only).

- Keep-alive: a connection whose response was read to its end goes back to a pool per
  (scheme, host, certificate checking), so the next request to that host costs no handshake.
- Two bounds: opening a connection (TCP, a proxy's CONNECT, TLS) waits at most
  `connect_timeout`; each read after that waits at most `timeout`. A host that is down costs
  the first bound once, not the second.
- Proxies from the environment (``https_proxy``, ``http_proxy``, ``no_proxy``), as containerd
  uses them: HTTPS goes through a CONNECT tunnel with TLS end to end, plain HTTP as
  absolute-URL requests; loopback hosts never go through a proxy.
- Certificates are checked unless the caller says the host is insecure (plain HTTP or a
  self-signed certificate, like docker's "insecure-registries").
- The scheme an insecure host speaks is learned once (`SchemeMemory`, kept in a file by
  apulld) and forgotten when a connection with it fails.
"""

from __future__ import annotations

import http.client
import ipaddress
import ssl
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from apull_node.image.registry_schemes import SchemeMemory

#: Idle connections kept per pool; more are closed when they are given back.
MAX_IDLE = 16
_SEND_SIZE = 1 << 16


@dataclass
class _Pool:
    idle: list[http.client.HTTPConnection] = field(default_factory=list)


@dataclass(frozen=True)
class Opened:
    """A connection for one request; `absolute` when it goes through a plain HTTP proxy
    (the request line then carries the whole URL); `pooled` when it was used before."""

    conn: http.client.HTTPConnection
    key: tuple[str, str, bool]
    absolute: bool
    pooled: bool


class Connections:
    """Pools, TLS contexts, proxies, timeouts and learned schemes for a process's registries."""

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        schemes_file: Path | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.schemes = SchemeMemory(schemes_file)
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, str, bool], _Pool] = {}
        self._proxies: dict[tuple[str, str], str] = {}
        self._verified = ssl.create_default_context()
        self._unverified = ssl.create_default_context()
        self._unverified.check_hostname = False
        self._unverified.verify_mode = ssl.CERT_NONE

    def take(self, scheme: str, netloc: str, verify: bool, fresh: bool = False) -> Opened:
        """An idle pooled connection to scheme://netloc, or a new one (`fresh`: always new).
        A new one is not connected yet: `open` does that under the connect bound."""
        key = (scheme, netloc, verify)
        proxy = self._proxies.get((scheme, netloc))
        if proxy is None:  # read from the environment once per host
            proxy = self._proxies[(scheme, netloc)] = _proxy_for(scheme, netloc)
        absolute = bool(proxy) and scheme == "http"
        if not fresh:
            with self._lock:
                pool = self._pools.get(key)
                if pool and pool.idle:
                    return Opened(pool.idle.pop(), key, absolute, True)
        conn: http.client.HTTPConnection
        if scheme == "https":
            tls = self._verified if verify else self._unverified
            conn = http.client.HTTPSConnection(
                proxy or netloc, timeout=self.connect_timeout, context=tls, blocksize=_SEND_SIZE
            )
            if proxy:
                conn.set_tunnel(netloc)  # CONNECT through the proxy, then TLS end to end
        elif scheme == "http":
            conn = http.client.HTTPConnection(
                proxy or netloc, timeout=self.connect_timeout, blocksize=_SEND_SIZE
            )
        else:
            raise ValueError(f"unsupported URL scheme {scheme!r}")
        return Opened(conn, key, absolute, False)

    def open(self, opened: Opened) -> None:
        """Connect a new connection (under connect_timeout), then bound each read by timeout."""
        conn = opened.conn
        if conn.sock is None:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(self.timeout)

    def give_back(self, opened: Opened) -> None:
        """A connection whose last response was read to its end: kept for the next request."""
        with self._lock:
            pool = self._pools.setdefault(opened.key, _Pool())
            if len(pool.idle) < MAX_IDLE:
                pool.idle.append(opened.conn)
                return
        opened.conn.close()


def _proxy_for(scheme: str, netloc: str) -> str:
    """host:port of the proxy the environment names for scheme://netloc, or "". Loopback
    hosts never go through one (as in Go, hence containerd); a proxy's user and password
    are not used (a proxy that wants them is not supported)."""
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    if is_loopback(netloc) or urllib.request.proxy_bypass(host):
        return ""
    proxy = urllib.request.getproxies().get(scheme, "")
    if not proxy:
        return ""
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.netloc.rpartition("@")[2]


def is_loopback(host: str) -> bool:
    """Whether host[:port] (or [v6]:port) names this machine: localhost or a loopback
    address (such registries may speak plain HTTP, like docker's, and skip proxies)."""
    name = host.rsplit(":", 1)[0].strip("[]") if not host.endswith("]") else host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
