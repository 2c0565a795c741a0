"""The one registry client: requests to one repository on one endpoint (standard library only).

apulld's range fetches, the converter's pulls and pushes and the lab's helpers all go
through `RegistrySession`:
- the scheme: HTTPS with certificate checks; for insecure endpoints (plain HTTP or a
  self-signed certificate) HTTPS unchecked when the server speaks TLS, else plain HTTP, found
  by one ``GET /v2/`` and remembered by the shared `Connections`; a mirror names its own URL
  (scheme, host, path prefix) and the ``?ns=<registry>`` query its requests carry;
- authentication as the distribution spec has it: a 401 carries a WWW-Authenticate
  challenge; for ``Bearer`` a token for ``repository:<repo>:pull[,push]`` comes from the
  realm (anonymously, or with Basic credentials from an auth file) and the request is sent
  again; for ``Basic`` the credentials go directly. Tokens are renewed on the next 401;
- redirects (GET and HEAD), dropping the Authorization header when they leave the host
  (blob storage behind a redirect has its own signed-URL auth);
- connections, proxies and timeouts from `registry_connections.Connections`, shared by the
  sessions of a process.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Optional, Union
from urllib.parse import urlencode, urljoin, urlsplit

from apull_node.image.registry_auth import AuthError, Credentials, parse_challenges
from apull_node.image.registry_connections import Connections, Opened

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
_READ_SIZE = 1 << 20
#: A response body at most this long is read to its end on close, so that its connection
#: can serve the next request (error bodies, empty answers).
_DRAIN_MAX = 1 << 16
#: AuthError.status of an answer that is not what the protocol says (no HTTP status).
INVALID = "invalid"
#: What a pooled connection the server had closed in the meantime raises on first use.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)

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
    """An HTTP response whose body has not been read yet; close it (or use `with`). A body
    read to its end gives the connection back for the next request."""

    def __init__(
        self, connections: Connections, opened: Opened, resp: http.client.HTTPResponse
    ) -> None:
        self._connections = connections
        self._opened = opened
        self._resp = resp
        self._closed = False
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}

    def read(self, limit: int = 64 << 20) -> bytes:
        data, complete = self.take(limit)
        if not complete:
            raise RegistryError(f"response body larger than {limit} bytes")
        return bytes(data)

    def take(self, limit: int) -> tuple[bytes, bool]:
        """At most `limit` bytes of the body, and whether that was all of it."""
        want = limit if self._resp.length is None else min(limit, self._resp.length)
        # Received straight into the bytes returned (io.BufferedReader reads big amounts
        # into the result): no zeroed buffer first, no copy after.
        body = self._resp.read(want)
        complete = self._resp.isclosed() or not self._resp.read(1)
        return body, complete

    def iter_body(self) -> Iterator[bytes]:
        while chunk := self._resp.read(_READ_SIZE):
            yield chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        resp = self._resp
        try:
            if not resp.isclosed() and resp.length is not None and resp.length <= _DRAIN_MAX:
                resp.read()
        except (OSError, http.client.HTTPException):
            pass
        if resp.isclosed() and not resp.will_close:
            self._connections.give_back(self._opened)
        else:
            resp.close()
            self._opened.conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _b: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class Mirror:
    """Where a session's requests go instead of the registry: a mirror's URL (scheme, host,
    optional path prefix) and the query each request carries (``?ns=<registry>``)."""

    url: str
    query: str = ""


class RegistrySession:
    """Requests to ``/v2/<repository>/...`` on one registry endpoint (host[:port]), or on a
    mirror of it."""

    def __init__(
        self,
        endpoint: str,
        repository: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        find_credentials: Callable[[], Credentials | None] | None = None,
        push: bool = False,
        timeout: float = 60.0,
        connections: Connections | None = None,
        mirror: Mirror | None = None,
        insecure_host: Callable[[str], bool] | None = None,
        scheme: str = "",
    ) -> None:
        """`find_credentials` is asked at each challenge (an auth file read anew) instead of
        fixed `credentials`. Without `connections` the session has connections of its own.
        Certificates are not checked on any host when `insecure`, unless `insecure_host`
        says which hosts (the registry's, its token realm's, a redirect's) may skip them.
        `scheme` fixes the registry's scheme (no probe)."""
        self.endpoint = endpoint
        self.repository = repository
        self.insecure = insecure
        self.credentials = credentials
        self._find_credentials = find_credentials
        self.actions = "pull,push" if push else "pull"
        self.connections = connections or Connections(timeout=timeout)
        self.mirror = mirror
        self._insecure_host = insecure_host
        self._fixed_scheme = scheme
        self._authorization = ""

    # -- public ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.mirror is not None:
            return self.mirror.url.rstrip("/")
        return f"{self._scheme()}://{self.endpoint}"

    def repo_url(self, suffix: str) -> str:
        """URL of /v2/<repository>/<suffix> (with a mirror's query)."""
        query = self.mirror.query if self.mirror is not None else ""
        return f"{self.base_url}/v2/{self.repository}/{suffix}{query}"

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: Body = None,
    ) -> Response:
        """Send with auth (answering one 401 challenge) and redirects (GET/HEAD only).
        RegistryError when no answer came, AuthError when no token or password could be
        had; any HTTP answer is returned, for the caller to judge."""
        for attempt in (1, 2):
            sent = dict(headers or {})
            authorization = self._authorization
            if authorization:
                sent["Authorization"] = authorization
            resp = self._send_following(method, url, sent, body)
            if resp.status != 401 or attempt == 2:
                return resp
            challenge = resp.headers.get("www-authenticate", "")
            resp.close()
            self._authorization = self._authenticate(challenge, method, url)
            if body is not None and not isinstance(body, bytes):
                body.seek(0)
        raise AssertionError("unreachable")

    # -- transport ------------------------------------------------------------------------

    def _verify(self, netloc: str) -> bool:
        """Whether certificates are checked on a host (see __init__)."""
        if self._insecure_host is not None:
            return not self._insecure_host(netloc)
        return not self.insecure

    def _send(self, method: str, url: str, headers: dict[str, str], body: Body) -> Response:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for fresh in (False, True):
            try:
                opened = self.connections.take(
                    parts.scheme, parts.netloc, self._verify(parts.netloc), fresh
                )
            except (ValueError, http.client.HTTPException) as exc:  # a bad URL or proxy
                raise RegistryError(f"{method} {url}: {exc}") from None
            conn = opened.conn
            try:
                self.connections.open(opened)
                conn.request(method, url if opened.absolute else target, body, headers)
                return Response(self.connections, opened, conn.getresponse())
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if opened.pooled and isinstance(exc, _STALE) and _rewind(body):
                    continue  # a kept connection the server had closed: once more, anew
                if parts.netloc == self.endpoint and self.mirror is None:
                    self.connections.schemes.forget(parts.netloc, parts.scheme)
                hint = ""
                if isinstance(exc, ssl.SSLError) and not self.insecure:
                    hint = " (a plain-HTTP or self-signed registry needs the insecure option)"
                why = str(exc) or type(exc).__name__
                raise RegistryError(f"{method} {url}: {why}{hint}") from exc
        raise AssertionError("unreachable")

    def _send_following(
        self, method: str, url: str, headers: dict[str, str], body: Body
    ) -> Response:
        origin = urlsplit(url).netloc
        for _ in range(_MAX_REDIRECTS + 1):
            resp = self._send(method, url, headers, body)
            location = resp.headers.get("location")
            if method not in ("GET", "HEAD") or resp.status not in _REDIRECTS or not location:
                return resp
            resp.close()
            url = urljoin(url, location)
            if urlsplit(url).netloc != origin:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise RegistryError(f"{method} {url}: more than {_MAX_REDIRECTS} redirects")

    def _scheme(self) -> str:
        """https, or for an insecure endpoint the scheme it was found to speak: HTTP only
        when HTTPS fails as a server that does not speak TLS does (a TLS error, or nothing
        listening), and HTTP answers with anything but 400 (what an HTTPS-only server says
        to plain HTTP). A timeout or reset says nothing about the scheme: it is raised, and
        nothing is learned."""
        if self._fixed_scheme:
            return self._fixed_scheme
        if not self.insecure:
            return "https"
        known = self.connections.schemes.get(self.endpoint)
        if known:
            return known
        try:
            with self._send("GET", f"https://{self.endpoint}/v2/", {}, None):
                scheme = "https"
        except RegistryError as tls_error:
            if not isinstance(tls_error.__cause__, (ssl.SSLError, ConnectionRefusedError)):
                raise
            try:
                with self._send("GET", f"http://{self.endpoint}/v2/", {}, None) as resp:
                    status = resp.status
            except RegistryError as plain_error:
                raise RegistryError(
                    f"registry {self.endpoint} answers neither HTTPS ({tls_error.__cause__}) "
                    f"nor HTTP ({plain_error.__cause__})"
                ) from plain_error
            if status == 400:  # an HTTPS-only server's answer to plain HTTP
                raise RegistryError(
                    f"registry {self.endpoint}: HTTPS failed ({tls_error.__cause__}) and "
                    f"plain HTTP answers GET /v2/ with HTTP {status}, not like a registry"
                ) from tls_error
            scheme = "http"
        self.connections.schemes.learned(self.endpoint, scheme)
        return scheme

    # -- auth -----------------------------------------------------------------------------

    def _credentials(self) -> Credentials | None:
        if self._find_credentials is not None:
            return self._find_credentials()
        return self.credentials

    def _authenticate(self, header: str, method: str, url: str) -> str:
        """The Authorization header that answers the challenge."""
        challenges = {c.scheme: c for c in parse_challenges(header)}
        credentials = self._credentials()
        if "bearer" in challenges:
            return "Bearer " + self._fetch_token(challenges["bearer"].params, credentials)
        if "basic" in challenges:
            if credentials is None:
                raise AuthError(
                    f"{method} {url}: registry {self.endpoint} wants a user name and password "
                    "and the auth file has none for it",
                    "401",
                )
            return credentials.basic_header()
        raise AuthError(
            f"{method} {url}: HTTP 401 with an unsupported challenge {header[:120]!r}", "401"
        )

    def _fetch_token(self, params: dict[str, str], credentials: Credentials | None) -> str:
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise AuthError(
                f"registry {self.endpoint}: token realm {realm!r} is not a URL", INVALID
            )
        scopes = [f"repository:{self.repository}:{self.actions}"]
        if params.get("scope") and params["scope"] not in scopes:
            scopes.append(params["scope"])
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query.extend(("scope", scope) for scope in scopes)
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Accept": "application/json"}
        if credentials is not None:
            headers["Authorization"] = credentials.basic_header()
        try:
            with self._send_following("GET", url, headers, None) as resp:
                body, _ = resp.take(1 << 20)
                status = resp.status
        except RegistryError as exc:
            raise AuthError(f"registry {self.endpoint}: token request failed: {exc}") from exc
        who = f"as {credentials.username}" if credentials else "anonymously"
        if status != 200:
            raise AuthError(
                f"registry {self.endpoint}: token for {' '.join(scopes)} refused {who}: "
                + error_text(status, body),
                str(status),
            )
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError) as exc:
            raise AuthError(f"registry {self.endpoint}: token answer is not JSON", INVALID) from exc
        if not isinstance(token, str) or not token:
            raise AuthError(f"registry {self.endpoint}: token answer has no token", INVALID)
        return token


def _rewind(body: Body) -> bool:
    """Whether the body can be sent again (none, bytes, or a file taken back to its start)."""
    if body is None or isinstance(body, bytes):
        return True
    try:
        body.seek(0)
    except (OSError, AttributeError):
        return False
    return True
