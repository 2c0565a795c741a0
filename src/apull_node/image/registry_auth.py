"""Registry credentials (docker-style auth files) and WWW-Authenticate challenges.

Auth files are JSON with ``{"auths": {"<host>": {"auth": base64("user:password")}}}`` (or
``username`` / ``password`` fields), as written by ``docker login``, ``podman login`` and
``skopeo login``. Credential helpers (``credsStore``, ``credHelpers``) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from apull_node.image.reference import DOCKER_HUB, DOCKER_HUB_ENDPOINT


class AuthError(RuntimeError):
    """Credentials cannot be read or a token cannot be had; the message says which and why.
    `status` is the HTTP status of a refusal by the registry ("" for a local problem)."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str]


_SCHEME = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)")
# auth-param list; quoted strings may contain commas and escaped quotes.
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse one WWW-Authenticate value (one or more challenges)."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        match = _SCHEME.match(header, pos)
        if not match:
            break
        scheme = match.group(1).lower()
        pos = match.end()
        params: dict[str, str] = {}
        while pos < len(header):
            param = _PARAM.match(header, pos)
            if not param:
                break
            value = param.group(2)
            value = re.sub(r"\\(.)", r"\1", value) if value is not None else param.group(3)
            params[param.group(1).lower()] = value
            pos = param.end()
        challenges.append(Challenge(scheme, params))
    return challenges


def _host_key(key: str) -> str:
    """Normalise an auths key ("https://index.docker.io/v1/", "host:port") to host[:port]."""
    host = urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    if host in ("index.docker.io", DOCKER_HUB_ENDPOINT, DOCKER_HUB):
        return DOCKER_HUB
    return host


def default_auth_files() -> list[Path]:
    """Where docker, podman and skopeo keep credentials, first match wins."""
    files: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("DOCKER_CONFIG"):
        files.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    files.append(Path.home() / ".docker" / "config.json")
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    return files


def load_auth_file(path: Path) -> dict[str, Credentials]:
    """host[:port] (docker.io for Docker Hub) -> credentials."""
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuthError(f"auth file {path}: {exc}") from exc
    auths = document.get("auths") if isinstance(document, dict) else None
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise AuthError(f"auth file {path}: 'auths' is not an object")
    found: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise AuthError(f"auth file {path}: entry {key!r} is not an object")
        username, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise AuthError(f"auth file {path}: entry {key!r}: bad 'auth': {exc}") from exc
            username, sep, password = decoded.partition(":")
            if not sep:
                raise AuthError(f"auth file {path}: entry {key!r}: 'auth' is not user:password")
        if isinstance(username, str) and isinstance(password, str) and username:
            found.setdefault(_host_key(str(key)), Credentials(username, password))
    return found


def find_credentials(registry: str, auth_file: Path | None = None) -> Credentials | None:
    """Credentials for `registry` (as written in the image reference), or None (anonymous)."""
    files = [auth_file] if auth_file is not None else default_auth_files()
    for path in files:
        if auth_file is None and not path.is_file():
            continue
        credentials = load_auth_file(path).get(_host_key(registry))
        if credentials is not None:
            return credentials
    return None
