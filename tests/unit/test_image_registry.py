"""Image references, auth files, WWW-Authenticate parsing, and the registry session against a
fake token-auth registry (plain HTTP and HTTPS with a self-signed certificate)."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apull.image.registry_read import fetch_blob_bytes, fetch_manifest, resolve_image
from apull_node.image.oci import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    sha256_digest,
)
from apull_node.image.reference import ImageRefError, parse_reference
from apull_node.image.registry_auth import (
    AuthError,
    Credentials,
    find_credentials,
    load_auth_file,
    parse_challenges,
)
from apull_node.image.registry_session import RegistryError, RegistrySession

# -- references -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "endpoint", "repository", "reference"),
    [
        ("busybox", "docker.io", "registry-1.docker.io", "library/busybox", "latest"),
        ("docker.io/library/busybox:1.36", "docker.io", "registry-1.docker.io",
         "library/busybox", "1.36"),
        ("index.docker.io/user/app", "docker.io", "registry-1.docker.io", "user/app", "latest"),
        ("127.0.0.1:5000/lab/busybox:latest", "127.0.0.1:5000", "127.0.0.1:5000",
         "lab/busybox", "latest"),
        ("localhost/a/b/c:v1.2-rc", "localhost", "localhost", "a/b/c", "v1.2-rc"),
        ("quay.io/org/img@sha256:" + "a" * 64, "quay.io", "quay.io", "org/img",
         "sha256:" + "a" * 64),
        ("[::1]:5000/x:y", "[::1]:5000", "[::1]:5000", "x", "y"),
    ],
)  # fmt: skip
def test_references(text, registry, endpoint, repository, reference):
    ref = parse_reference(text)
    assert (ref.registry, ref.endpoint, ref.repository, ref.reference) == (
        registry,
        endpoint,
        repository,
        reference,
    )


@pytest.mark.parametrize(
    "text", ["", "Upper/case", "host:5000/x@sha256:abc", "a/b:bad tag", "a//b", " a/b", "a/b:"]
)
def test_bad_references(text):
    with pytest.raises(ImageRefError):
        parse_reference(text)


def test_tag_and_digest_both_kept():
    ref = parse_reference("r.io/a:t@sha256:" + "b" * 64)
    assert (ref.tag, ref.reference) == ("t", "sha256:" + "b" * 64)
    assert str(ref) == "r.io/a:t@sha256:" + "b" * 64


# -- auth files and challenges --------------------------------------------------------------


def test_challenges():
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push", Basic realm="x, \\"y\\""'
    )
    bearer, basic = parse_challenges(header)
    assert bearer.scheme == "bearer" and basic.scheme == "basic"
    assert bearer.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull,push",
    }
    assert basic.params == {"realm": 'x, "y"'}
    assert parse_challenges("Basic realm=plain")[0].params == {"realm": "plain"}


def test_auth_file(tmp_path, monkeypatch):
    path = tmp_path / "auth.json"
    encoded = base64.b64encode(b"alice:s3cr:et").decode()
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": encoded},
                    "reg.example:5000": {"username": "bob", "password": "pw"},
                    "empty.example": {},
                },
                "credsStore": "desktop",
            }
        )
    )
    creds = load_auth_file(path)
    assert creds["docker.io"] == Credentials("alice", "s3cr:et")
    assert creds["reg.example:5000"] == Credentials("bob", "pw")
    assert "empty.example" not in creds and "s3cr" not in repr(creds)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    assert find_credentials("docker.io") == Credentials("alice", "s3cr:et")
    assert find_credentials("other.example") is None
    path.write_text('{"auths": {"x": {"auth": "not base64!"}}}')
    with pytest.raises(AuthError, match="bad 'auth'"):
        load_auth_file(path)


# -- a fake registry with token auth --------------------------------------------------------

TOKEN = "tok-123"
CONFIG = b'{"rootfs":{"diff_ids":[]}}'
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "x", "digest": sha256_digest(CONFIG), "size": len(CONFIG)},
        "layers": [],
    }
).encode()
INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 1,
             "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": DOCKER_MANIFEST, "digest": sha256_digest(MANIFEST), "size": 1,
             "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
).encode()  # fmt: skip


class FakeRegistry(BaseHTTPRequestHandler):
    require_user = False
    log: list[tuple[str, str, str]]

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        self.server.log.append((self.command, self.path, auth))
        host = self.headers["Host"]
        if self.path.startswith("/token"):
            if self.require_user:
                expected = "Basic " + base64.b64encode(b"alice:pw").decode()
                if auth != expected:
                    return self._send(401, b'{"errors":[{"code":"DENIED","message":"who?"}]}')
            assert "scope=repository%3Aorg%2Fimg%3Apull" in self.path
            return self._send(200, json.dumps({"token": TOKEN}).encode())
        if self.path.startswith("/storage/"):
            assert not auth, "Authorization leaked to blob storage"
            return self._send(200, CONFIG)
        if auth != f"Bearer {TOKEN}":
            scheme = "https" if self.server.tls else "http"
            realm = f"{scheme}://{host}/token"
            challenge = f'Bearer realm="{realm}",service="fake",scope="repository:org/img:pull"'
            return self._send(401, b'{"errors":[]}', {"WWW-Authenticate": challenge})
        if self.path == "/v2/org/img/manifests/multi":
            return self._send(200, INDEX, {"Content-Type": OCI_INDEX})
        if self.path == f"/v2/org/img/manifests/{sha256_digest(MANIFEST)}":
            return self._send(200, MANIFEST, {"Content-Type": DOCKER_MANIFEST})
        if self.path == f"/v2/org/img/blobs/{sha256_digest(CONFIG)}":
            # Redirect to "another host" (same server, other name): no Authorization there.
            other = host.replace("127.0.0.1", "localhost")
            scheme = "https" if self.server.tls else "http"
            return self._send(307, headers={"Location": f"{scheme}://{other}/storage/x?sig=1"})
        return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"nope"}]}')


@pytest.fixture
def fake(tmp_path):
    servers = []

    def start(tls=False, require_user=False):
        handler = type("Handler", (FakeRegistry,), {"require_user": require_user})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.log = []
        server.tls = tls
        if tls:
            cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=fake",
                 "-keyout", str(key), "-out", str(cert)],
                check=True, capture_output=True,
            )  # fmt: skip
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server, f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_bearer_token_index_and_redirect(fake):
    server, address = fake()
    session = RegistrySession(address, "org/img", insecure=True)
    manifest, top = resolve_image(session, "multi", {"os": "linux", "architecture": "amd64"})
    assert top == sha256_digest(INDEX) and manifest.digest == sha256_digest(MANIFEST)
    assert fetch_blob_bytes(session, manifest.config) == CONFIG
    # One token fetch for the whole session; the token is sent to the registry only.
    assert sum(1 for _, path, _ in server.log if path.startswith("/token")) == 1
    assert all(auth == "" for _, path, auth in server.log if path.startswith("/storage"))


def test_credentials_are_sent_to_the_token_endpoint(fake):
    _, address = fake(require_user=True)
    anonymous = RegistrySession(address, "org/img", insecure=True)
    with pytest.raises(AuthError, match=r"refused anonymously: HTTP 401 \(DENIED: who\?\)"):
        fetch_manifest(anonymous, "multi")
    session = RegistrySession(
        address, "org/img", insecure=True, credentials=Credentials("alice", "pw")
    )
    assert fetch_manifest(session, "multi")[2] == sha256_digest(INDEX)


def test_missing_manifest_error_names_the_url(fake):
    _, address = fake()
    session = RegistrySession(address, "org/img", insecure=True)
    with pytest.raises(RegistryError, match=r"manifests/none: HTTP 404 \(MANIFEST_UNKNOWN: nope\)"):
        fetch_manifest(session, "none")


def test_platform_missing_from_index(fake):
    _, address = fake()
    session = RegistrySession(address, "org/img", insecure=True)
    with pytest.raises(ManifestError, match=r"no image for linux/s390x.*linux/amd64, linux/arm64"):
        resolve_image(session, "multi", {"os": "linux", "architecture": "s390x"})


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_https_verified_unless_insecure(fake):
    _, address = fake(tls=True)
    insecure = RegistrySession(address, "org/img", insecure=True)
    assert insecure.base_url.startswith("https://")
    assert fetch_manifest(insecure, "multi")[2] == sha256_digest(INDEX)
    secure = RegistrySession(address, "org/img")
    with pytest.raises(RegistryError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch_manifest(secure, "multi")


def test_nothing_listening(tmp_path):
    from conftest import free_port

    session = RegistrySession(f"127.0.0.1:{free_port()}", "a/b", insecure=True)
    with pytest.raises(RegistryError, match=r"answers neither HTTPS .* nor HTTP"):
        fetch_manifest(session, "x")


def test_descriptor_round_trip():
    raw = {"mediaType": "m", "digest": "sha256:" + "1" * 64, "size": 3,
           "annotations": {"a": "b"}, "artifactType": "t"}  # fmt: skip
    assert Descriptor.parse(raw, "x").to_json() == raw
    with pytest.raises(ManifestError, match="size"):
        Descriptor.parse({**raw, "size": -1}, "x")
    with pytest.raises(ManifestError, match="digest"):
        Descriptor.parse({**raw, "digest": "md5:00"}, "x")
