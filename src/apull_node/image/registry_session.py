"""HTTP(S) to one repository of a registry: scheme choice, token auth, redirects, proxies.

Standard library only (http.client). Secure sessions speak HTTPS with certificate checks.
Insecure sessions try HTTPS without certificate checks first and fall back to plain HTTP
when the server does not speak TLS, like docker's "insecure-registries".

Authentication follows the distribution spec: a 401 carries a WWW-Authenticate challenge;
for ``Bearer`` a token for ``repository:<repo>:pull[,push]`` is fetched from the realm
(anonymously, or with Basic credentials from an auth file) and the request is sent again;
for ``Basic`` the credentials are sent directly. Tokens are renewed on the next 401.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Optional, Union
from urllib.parse import urlencode, urljoin, urlsplit

from apull_node.image.registry_auth import AuthError, Credentials, parse_challenges

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
_READ_SIZE = 1 << 20
_SEND_SIZE = 1 << 16

Body = Optional[Union[bytes, BinaryIO]]


class RegistryError(RuntimeError):
    """A registry request failed; the message names the registry, the request and why."""


def error_text(status: int, body: bytes) -> str:
    """HTTP status plus the registry's error codes and messages, if it sent any."""
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errors)
    except (ValueError, AttributeError):
        text = body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f" ({text})" if text else "")


class Response:
    """An HTTP response whose body has not been read yet; close it (or use `with`)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._resp = resp
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}

    def read(self, limit: int = 64 << 20) -> bytes:
        data = self._resp.read(limit + 1)
        if len(data) > limit:
            raise RegistryError(f"response body larger than {limit} bytes")
        return data

    def iter_body(self) -> Iterator[bytes]:
        while chunk := self._resp.read(_READ_SIZE):
            yield chunk

    def close(self) -> None:
        self._resp.close()
        self._conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _b: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class _Target:
    scheme: str
    netloc: str
    path: str  # with query


def _split(url: str) -> _Target:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(parts.scheme, parts.netloc, path)


class RegistrySession:
    """Requests to ``/v2/<repository>/...`` on one registry endpoint (host[:port])."""

    def __init__(
        self,
        endpoint: str,
        repository: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        push: bool = False,
        timeout: float = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.repository = repository
        self.insecure = insecure
        self.credentials = credentials
        self.actions = "pull,push" if push else "pull"
        self.timeout = timeout
        self._scheme = "" if insecure else "https"
        self._authorization = ""
        self._tls = ssl.create_default_context()
        if insecure:
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE

    # -- public ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if not self._scheme:
            self._scheme = self._probe_scheme()
        return f"{self._scheme}://{self.endpoint}"

    def repo_url(self, suffix: str) -> str:
        """URL of /v2/<repository>/<suffix>."""
        return f"{self.base_url}/v2/{self.repository}/{suffix}"

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: Body = None,
    ) -> Response:
        """Send with auth (answering one 401 challenge) and redirects (GET/HEAD only)."""
        for attempt in (1, 2):
            sent = dict(headers or {})
            if self._authorization:
                sent["Authorization"] = self._authorization
            resp = self._send_following(method, url, sent, body)
            if resp.status != 401 or attempt == 2:
                return resp
            challenge = resp.headers.get("www-authenticate", "")
            resp.close()
            self._authenticate(challenge, method, url)
            if body is not None and not isinstance(body, bytes):
                body.seek(0)
        raise AssertionError("unreachable")

    # -- transport ------------------------------------------------------------------------

    def _connection(self, scheme: str, netloc: str) -> tuple[http.client.HTTPConnection, bool]:
        """A connection for scheme://netloc; True if it goes through a plain HTTP proxy."""
        proxy = self._proxy_for(scheme, netloc)
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                proxy or netloc, timeout=self.timeout, context=self._tls, blocksize=_SEND_SIZE
            )
            if proxy:
                conn.set_tunnel(netloc)  # CONNECT through the proxy, then TLS end to end
            return conn, False
        if scheme != "http":
            raise RegistryError(f"unsupported URL scheme {scheme!r}")
        conn = http.client.HTTPConnection(
            proxy or netloc, timeout=self.timeout, blocksize=_SEND_SIZE
        )
        return conn, bool(proxy)

    @staticmethod
    def _proxy_for(scheme: str, netloc: str) -> str:
        host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
        if urllib.request.proxy_bypass(host):
            return ""
        proxy = urllib.request.getproxies().get(scheme, "")
        if not proxy:
            return ""
        return urlsplit(proxy if "://" in proxy else f"http://{proxy}").netloc

    def _send(self, method: str, url: str, headers: dict[str, str], body: Body) -> Response:
        target = _split(url)
        conn, absolute = self._connection(target.scheme, target.netloc)
        try:
            conn.request(method, url if absolute else target.path, body=body, headers=headers)
            return Response(conn, conn.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            hint = ""
            if isinstance(exc, ssl.SSLError) and not self.insecure:
                hint = " (a plain-HTTP or self-signed registry needs the insecure option)"
            raise RegistryError(f"{method} {url}: {exc}{hint}") from exc

    def _send_following(
        self, method: str, url: str, headers: dict[str, str], body: Body
    ) -> Response:
        origin = _split(url).netloc
        for _ in range(_MAX_REDIRECTS + 1):
            resp = self._send(method, url, headers, body)
            location = resp.headers.get("location")
            if method not in ("GET", "HEAD") or resp.status not in _REDIRECTS or not location:
                return resp
            resp.close()
            url = urljoin(url, location)
            if _split(url).netloc != origin:
                # Blob storage behind a redirect has its own (signed URL) auth.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise RegistryError(f"{method} {url}: more than {_MAX_REDIRECTS} redirects")

    def _probe_scheme(self) -> str:
        """Insecure sessions: HTTPS (unverified) if the server speaks TLS, else HTTP."""
        try:
            with self._send("GET", f"https://{self.endpoint}/v2/", {}, None):
                return "https"
        except RegistryError as tls_error:
            try:
                with self._send("GET", f"http://{self.endpoint}/v2/", {}, None):
                    return "http"
            except RegistryError as plain_error:
                raise RegistryError(
                    f"registry {self.endpoint} answers neither HTTPS ({tls_error.__cause__}) "
                    f"nor HTTP ({plain_error.__cause__})"
                ) from plain_error

    # -- auth -----------------------------------------------------------------------------

    def _authenticate(self, header: str, method: str, url: str) -> None:
        challenges = {c.scheme: c for c in parse_challenges(header)}
        if "bearer" in challenges:
            self._authorization = "Bearer " + self._fetch_token(challenges["bearer"].params)
        elif "basic" in challenges:
            if self.credentials is None:
                raise AuthError(
                    f"{method} {url}: registry {self.endpoint} wants a user name and password "
                    "and the auth file has none for it"
                )
            self._authorization = self.credentials.basic_header()
        else:
            raise AuthError(
                f"{method} {url}: HTTP 401 with an unsupported challenge {header[:120]!r}"
            )

    def _fetch_token(self, params: dict[str, str]) -> str:
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"registry {self.endpoint}: token realm {realm!r} is not a URL")
        scopes = [f"repository:{self.repository}:{self.actions}"]
        if params.get("scope") and params["scope"] not in scopes:
            scopes.append(params["scope"])
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query.extend(("scope", scope) for scope in scopes)
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic_header()
        try:
            with self._send_following("GET", url, headers, None) as resp:
                body = resp.read(1 << 20)
                status = resp.status
        except RegistryError as exc:
            raise AuthError(f"registry {self.endpoint}: token request failed: {exc}") from exc
        who = f"as {self.credentials.username}" if self.credentials else "anonymously"
        if status != 200:
            raise AuthError(
                f"registry {self.endpoint}: token for {' '.join(scopes)} refused {who}: "
                + error_text(status, body)
            )
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError) as exc:
            raise AuthError(f"registry {self.endpoint}: token answer is not JSON") from exc
        if not isinstance(token, str) or not token:
            raise AuthError(f"registry {self.endpoint}: token answer has no token")
        return token
