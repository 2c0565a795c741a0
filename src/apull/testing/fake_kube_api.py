"""A FAKE Kubernetes API server, for tests only.

This is not a Kubernetes implementation and must never be used as one. It is a small
in-memory HTTP server (stdlib ``http.server``) that answers just enough of the Kubernetes
API for a real ``kubectl`` to run ``cordon``, ``drain`` and ``uncordon`` against a fixed set
of nodes and pods, and it records every request it receives so that tests can assert on
what ``kubectl`` (or an Ansible role driving it) actually asked for.

What it serves (everything else is a 404 with a Kubernetes ``Status`` body, recorded too):

* discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/apps/v1``,
  ``/apis/policy/v1``; always legacy (unaggregated) discovery in plain ``application/json``,
  which kubectl accepts in place of aggregated discovery. ``/api/v1`` advertises the
  ``pods/eviction`` subresource (group ``policy``, version ``v1``), which is how
  ``kubectl drain`` decides to evict rather than delete.
* nodes: ``GET /api/v1/nodes``, ``GET /api/v1/nodes/{name}``, ``PATCH /api/v1/nodes/{name}``
  (strategic-merge or JSON-merge patch, applied as an RFC 7386 merge: enough for
  ``spec.unschedulable``, not a full strategic-merge implementation).
* pods: ``GET /api/v1/pods`` and ``GET /api/v1/namespaces/{ns}/pods`` (``fieldSelector`` on
  ``spec.nodeName``, ``metadata.name``, ``metadata.namespace``, ``status.phase``; simple
  ``labelSelector``), ``GET``/``DELETE /api/v1/namespaces/{ns}/pods/{name}``, and
  ``POST /api/v1/namespaces/{ns}/pods/{name}/eviction`` (removes the pod at once, 201).
* ``GET /apis/apps/v1/namespaces/{ns}/daemonsets/{name}`` for every DaemonSet named as a
  controller in a pod's ``ownerReferences``: ``kubectl drain --ignore-daemonsets`` looks the
  DaemonSet up before it skips the pod.

No authentication, no TLS, no watches, no resourceVersion semantics, no admission, no
PodDisruptionBudgets. Nodes and pods exist only in memory for the server's lifetime.

Run it in the foreground for Ansible-driven tests::

    python -m apull.testing.fake_kube_api --nodes node1,node2 --kubeconfig K --record R.jsonl

which writes a kubeconfig pointing at it and appends each request to ``R.jsonl`` as one JSON
object per line (``{"method": ..., "path": ..., "body": ...}``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, unquote, urlsplit

JSON = dict[str, Any]

FAKE_SERVER_VERSION = "v1.37.0-fake"
_POLL_INTERVAL = 0.05  # seconds; how soon stop() (or SIGTERM) takes effect


class RecordedRequest(NamedTuple):
    """One request as the fake server received it."""

    method: str
    path: str  # as sent on the request line, query string included (still URL-encoded)
    body: Any  # the decoded JSON body; None without a body; the raw text if it is not JSON

    def to_json(self) -> JSON:
        return {"method": self.method, "path": self.path, "body": self.body}


class _Error(Exception):
    """An API error, answered as a Kubernetes ``Status``."""

    def __init__(
        self, code: HTTPStatus, reason: str, message: str, details: JSON | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, details: JSON | None = None) -> JSON:
    """A failure ``metav1.Status`` object, as the API server sends with errors."""
    body: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


def _not_found(kind: str, name: str, group: str = "") -> _Error:
    plural = f"{kind}.{group}" if group else kind
    details: JSON = {"name": name, "kind": kind}
    if group:
        details["group"] = group
    return _Error(HTTPStatus.NOT_FOUND, "NotFound", f'{plural} "{name}" not found', details)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; strategic-merge ``$`` directives are dropped.

    Plain strategic-merge patches of scalar fields (what ``kubectl cordon`` sends) mean the
    same as JSON merge patches, so this is all the fake needs.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_RESOURCE = {"verbs": ["get", "list"], "singularName": "", "storageVersionHash": ""}
_CORE_RESOURCES: list[JSON] = [
    {"name": "namespaces", "kind": "Namespace", "namespaced": False, "shortNames": ["ns"]},
    {"name": "nodes", "kind": "Node", "namespaced": False, "shortNames": ["no"],
     "verbs": ["get", "list", "patch"]},
    {"name": "pods", "kind": "Pod", "namespaced": True, "shortNames": ["po"],
     "categories": ["all"], "verbs": ["delete", "get", "list"]},
    {"name": "pods/eviction", "kind": "Eviction", "namespaced": True, "group": "policy",
     "version": "v1", "verbs": ["create"]},
]  # fmt: skip
_APPS_RESOURCES: list[JSON] = [
    {"name": "daemonsets", "kind": "DaemonSet", "namespaced": True, "shortNames": ["ds"]},
]
_POLICY_RESOURCES: list[JSON] = [
    {"name": "poddisruptionbudgets", "kind": "PodDisruptionBudget", "namespaced": True,
     "shortNames": ["pdb"]},
]  # fmt: skip
_GROUPS = {"apps": _APPS_RESOURCES, "policy": _POLICY_RESOURCES}


def _resource_list(group_version: str, resources: list[JSON]) -> JSON:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [_RESOURCE | resource for resource in resources],
    }


def _api_group_list() -> JSON:
    groups = []
    for name in _GROUPS:
        version = {"groupVersion": f"{name}/v1", "version": "v1"}
        groups.append({"name": name, "versions": [version], "preferredVersion": version})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


_FIELD_TERM = re.compile(r"^([A-Za-z.]+)(==|!=|=)(.*)$")
_LABEL_TERM = re.compile(r"^\s*(!?)([A-Za-z0-9./_-]+)\s*(?:(==|!=|=)\s*([A-Za-z0-9._-]*))?\s*$")


def _pod_field(pod: JSON, field: str) -> str:
    path = {
        "spec.nodeName": ("spec", "nodeName"),
        "metadata.name": ("metadata", "name"),
        "metadata.namespace": ("metadata", "namespace"),
        "status.phase": ("status", "phase"),
    }.get(field)
    if path is None:
        raise _Error(
            HTTPStatus.BAD_REQUEST,
            "BadRequest",
            f'field label "{field}" not supported for pods (fake API server)',
        )
    return str(pod.get(path[0], {}).get(path[1], ""))


def _pod_filter(field_selector: str, label_selector: str) -> Callable[[JSON], bool]:
    field_terms = []
    for term in filter(None, field_selector.split(",")):
        match = _FIELD_TERM.match(term)
        if match is None:
            raise _Error(HTTPStatus.BAD_REQUEST, "BadRequest", f"invalid field selector {term!r}")
        field_terms.append((match[1], match[2] != "!=", match[3]))
    label_terms = []
    for term in filter(None, label_selector.split(",")):
        match = _LABEL_TERM.match(term)
        if match is None or (match[1] and match[3]):
            raise _Error(
                HTTPStatus.BAD_REQUEST, "BadRequest", f"unsupported label selector {term!r}"
            )
        label_terms.append((match[2], match[1], match[3], match[4]))

    def matches(pod: JSON) -> bool:
        for field, equal, value in field_terms:
            if (_pod_field(pod, field) == value) != equal:
                return False
        labels: dict[str, str] = pod["metadata"].get("labels") or {}
        for key, negated, operator, value in label_terms:
            if operator is None:
                if (key in labels) == bool(negated):
                    return False
            elif (labels.get(key) == value) != (operator != "!="):
                return False
        return True

    for field, _equal, _value in field_terms:  # reject unsupported fields even with no pods
        _pod_field({}, field)
    return matches


class FakeKubeAPI:
    """An in-memory FAKE Kubernetes API server for tests (see the module docstring).

    ``nodes`` names the nodes; ``pods`` maps a node name to the pods on it (partial Pod
    objects: ``metadata.name`` is required, the rest is filled in). ``record_path``, if
    given, gets every request appended as a JSON line as well.
    """

    def __init__(
        self,
        nodes: list[str],
        pods: dict[str, list[JSON]] | None = None,
        *,
        record_path: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._record_path = record_path
        self._host = host
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._resource_version = 1
        self._nodes: dict[str, JSON] = {name: self._new_node(name) for name in nodes}
        self._pods: dict[tuple[str, str], JSON] = {}
        self._daemonsets: set[tuple[str, str]] = set()
        for node_name, node_pods in (pods or {}).items():
            if node_name not in self._nodes:
                raise ValueError(f"pods given for unknown node {node_name!r}")
            for pod in node_pods:
                self._add_pod(node_name, pod)

    # -- state ------------------------------------------------------------------------------

    def _next_resource_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def _new_node(self, name: str) -> JSON:
        return {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "resourceVersion": self._next_resource_version(),
                "creationTimestamp": _now(),
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            },
            "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Fake"}]},
        }

    def _add_pod(self, node_name: str, given: JSON) -> None:
        pod = copy.deepcopy(given)
        metadata = pod.setdefault("metadata", {})
        if not metadata.get("name"):
            raise ValueError(f"a pod on {node_name!r} has no metadata.name")
        pod.setdefault("kind", "Pod")
        pod.setdefault("apiVersion", "v1")
        metadata.setdefault("namespace", "default")
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", _now())
        metadata["resourceVersion"] = self._next_resource_version()
        spec = pod.setdefault("spec", {})
        spec["nodeName"] = node_name
        spec.setdefault("containers", [{"name": "main", "image": "registry.invalid/fake:1"}])
        pod.setdefault("status", {}).setdefault("phase", "Running")
        key = (metadata["namespace"], metadata["name"])
        if key in self._pods:
            raise ValueError(f"duplicate pod {key[0]}/{key[1]}")
        self._pods[key] = pod
        for owner in metadata.get("ownerReferences") or []:
            if owner.get("kind") == "DaemonSet" and owner.get("controller"):
                self._daemonsets.add((metadata["namespace"], owner["name"]))

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def node(self, name: str) -> JSON:
        """A copy of the node's current object (KeyError if there is no such node)."""
        with self._lock:
            return copy.deepcopy(self._nodes[name])

    def pods(self, node: str | None = None) -> list[JSON]:
        """Copies of the pods still present, optionally only those on ``node``."""
        with self._lock:
            return [
                copy.deepcopy(pod)
                for pod in self._pods.values()
                if node is None or pod["spec"]["nodeName"] == node
            ]

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake API server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def bind(self) -> str:
        """Bind the listening socket (port 0 by default: any free port); return the base URL."""
        if self._server is None:
            self._server = _Server((self._host, self._port), _Handler, self)
        return self.url

    def start(self) -> str:
        """Bind, serve in a background thread, return the base URL."""
        if self._thread is not None:
            raise RuntimeError("the fake API server is already started")
        self.bind()
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name="fake-kube-api",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def serve_forever(self) -> None:
        """Bind if need be and serve in the calling thread until :meth:`stop` (from elsewhere)."""
        self.bind()
        assert self._server is not None
        self._server.serve_forever(poll_interval=_POLL_INTERVAL)

    def stop(self) -> None:
        """Stop serving and close the socket (safe to call twice)."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._thread is not None:
            server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig (plain http, no credentials) for this server; return ``path``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
            "preferences": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is valid YAML
        return path

    # -- request handling (called from handler threads) ------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            if self._record_path is not None:
                with self._record_path.open("a") as record:
                    record.write(json.dumps(request.to_json()) + "\n")

    def handle(self, method: str, raw_path: str, content_type: str, body: Any) -> tuple[int, JSON]:
        """Answer one request: (HTTP status, JSON body)."""
        self._record(RecordedRequest(method, raw_path, body))
        url = urlsplit(raw_path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        parts = [unquote(part) for part in url.path.strip("/").split("/") if part]
        try:
            with self._lock:
                return self._route(method, parts, query, content_type, body)
        except _Error as error:
            return error.code, status_body(error.code, error.reason, error.message, error.details)

    def _route(
        self, method: str, parts: list[str], query: dict[str, str], content_type: str, body: Any
    ) -> tuple[int, JSON]:
        ok = HTTPStatus.OK
        match method, parts:
            case "GET", ["version"]:
                return ok, {
                    "major": "1",
                    "minor": "37",
                    "gitVersion": FAKE_SERVER_VERSION,
                    "gitCommit": "0000000000000000000000000000000000000000",
                    "gitTreeState": "clean",
                    "buildDate": "1970-01-01T00:00:00Z",
                    "goVersion": "none",
                    "compiler": "none (fake API server, Python)",
                    "platform": "linux/amd64",
                }
            case "GET", ["api"]:
                return ok, {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
                    ],
                }
            case "GET", ["api", "v1"]:
                return ok, _resource_list("v1", _CORE_RESOURCES)
            case "GET", ["apis"]:
                return ok, _api_group_list()
            case "GET", ["apis", group, "v1"] if group in _GROUPS:
                return ok, _resource_list(f"{group}/v1", _GROUPS[group])
            case "GET", ["api", "v1", "nodes"]:
                return ok, self._list("NodeList", list(self._nodes.values()))
            case "GET", ["api", "v1", "nodes", name]:
                return ok, self._get_node(name)
            case "PATCH", ["api", "v1", "nodes", name]:
                return ok, self._patch_node(name, content_type, body, query)
            case "GET", ["api", "v1", "pods"]:
                return ok, self._list_pods(None, query)
            case "GET", ["api", "v1", "namespaces", namespace, "pods"]:
                return ok, self._list_pods(namespace, query)
            case "GET", ["api", "v1", "namespaces", namespace, "pods", name]:
                return ok, self._get_pod(namespace, name)
            case "DELETE", ["api", "v1", "namespaces", namespace, "pods", name]:
                return ok, self._remove_pod(namespace, name, query)
            case "POST", ["api", "v1", "namespaces", namespace, "pods", name, "eviction"]:
                self._remove_pod(namespace, name, query)
                created = HTTPStatus.CREATED
                return created, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                 "status": "Success", "code": int(created)}  # fmt: skip
            case "GET", ["apis", "apps", "v1", "namespaces", namespace, "daemonsets", name]:
                if (namespace, name) not in self._daemonsets:
                    raise _not_found("daemonsets", name, "apps")
                return ok, {
                    "kind": "DaemonSet",
                    "apiVersion": "apps/v1",
                    "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())},
                    "spec": {"selector": {"matchLabels": {"app": name}}},
                    "status": {},
                }
        raise _Error(
            HTTPStatus.NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource (fake API server)",
        )

    def _list(self, kind: str, items: list[JSON]) -> JSON:
        listed = []
        for item in items:
            item = copy.deepcopy(item)
            item.pop("kind", None)
            item.pop("apiVersion", None)
            listed.append(item)
        return {
            "kind": kind,
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._resource_version)},
            "items": listed,
        }

    def _get_node(self, name: str) -> JSON:
        if name not in self._nodes:
            raise _not_found("nodes", name)
        return copy.deepcopy(self._nodes[name])

    def _patch_node(self, name: str, content_type: str, body: Any, query: dict[str, str]) -> JSON:
        node = self._get_node(name)
        media_type = content_type.split(";")[0].strip()
        if media_type not in (
            "application/strategic-merge-patch+json",
            "application/merge-patch+json",
        ):
            raise _Error(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                f"the fake API server only takes merge patches, not {media_type!r}",
            )
        if not isinstance(body, dict):
            raise _Error(HTTPStatus.BAD_REQUEST, "BadRequest", "the patch is not a JSON object")
        patched: JSON = merge_patch(node, body)
        patched["kind"], patched["apiVersion"] = "Node", "v1"
        patched["metadata"] = merge_patch(patched.get("metadata"), {"name": name})
        if "dryRun" not in query:
            patched["metadata"]["resourceVersion"] = self._next_resource_version()
            self._nodes[name] = patched
        return copy.deepcopy(patched)

    def _list_pods(self, namespace: str | None, query: dict[str, str]) -> JSON:
        matches = _pod_filter(query.get("fieldSelector", ""), query.get("labelSelector", ""))
        pods = [
            pod
            for (pod_namespace, _name), pod in sorted(self._pods.items())
            if (namespace is None or pod_namespace == namespace) and matches(pod)
        ]
        return self._list("PodList", pods)

    def _get_pod(self, namespace: str, name: str) -> JSON:
        pod = self._pods.get((namespace, name))
        if pod is None:
            raise _not_found("pods", name)
        return copy.deepcopy(pod)

    def _remove_pod(self, namespace: str, name: str, query: dict[str, str]) -> JSON:
        pod = self._get_pod(namespace, name)
        if "dryRun" not in query:
            del self._pods[(namespace, name)]
        return pod


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], api: FakeKubeAPI
    ) -> None:
        super().__init__(address, handler)
        self.api = api


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeKubeAPI/0 (tests only)"
    server: _Server

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        raw = self._read_body()
        body: Any = None
        if raw:
            text = raw.decode("utf-8", errors="replace")
            try:
                body = json.loads(text)
            except ValueError:
                body = text
        code, answer = self.server.api.handle(
            self.command, self.path, self.headers.get("Content-Type", ""), body
        )
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the record is the log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apull.testing.fake_kube_api",
        description="Run a FAKE Kubernetes API server (tests only) in the foreground.",
    )
    parser.add_argument("--nodes", required=True, help="comma-separated node names")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="kubeconfig to write")
    parser.add_argument("--record", type=Path, required=True, help="JSON-lines request log")
    parser.add_argument("--pods", type=Path, help="JSON file: {node name: [partial Pod objects]}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    args = parser.parse_args(argv)

    nodes = [name.strip() for name in args.nodes.split(",") if name.strip()]
    pods = json.loads(args.pods.read_text()) if args.pods else None
    api = FakeKubeAPI(nodes, pods, record_path=args.record, host=args.host, port=args.port)
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.touch()
    api.bind()
    api.write_kubeconfig(args.kubeconfig)
    print(f"fake Kubernetes API server (tests only) at {api.url}", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        api.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
