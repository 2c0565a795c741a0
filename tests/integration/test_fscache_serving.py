"""apulld's fscache backend against the real kernel, on lab node1 (Debian 12, 6.1 with the
rebuilt on-demand cachefiles/erofs modules): a converted layer is mounted
`-t erofs none -o fsid=<blob_id>`, read and compared with its source; only a fraction of the
blob crosses the network; `systemctl restart apulld` in the middle of a read leaves the
read complete and correct; a corrupt range gives EIO or correct data, never wrong bytes.

The node reaches the registry through a counting/corrupting proxy on the host (from
tests/unit/serving_support.py), brought to the node's loopback by `ssh -R` (QEMU lets the
node reach only the registry and the package repository on the host).

Needs `apull sync-bin node1` first (the apulld under test). When no apulld.service is
deployed on node1, the role's unit template is installed under /run/systemd/system for the
test and removed afterwards. Figures are printed (pytest -s).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import random
import shlex
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from serving_support import Corruption, Layer, Proxy, convert_layer

from apull.config import default_config_path, load_config
from apull.lab import layout, nodes
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient

ROOT = Path(__file__).resolve().parents[2]
REPO = "test/fscache-files"
TUNNEL_PORT = 15005  # the proxy, as node1 sees it (its loopback, via ssh -R)
TEST_DIR = "/run/apull-fscache-test"
TEST_CACHE = "/var/lib/apull-fscache-test"
RUNTIME_UNIT = "/run/systemd/system/apulld.service"
MOUNT_ROOT = "/mnt/apull-fscache-test"
BIG = "data/big"
BIG_SIZE = 24 << 20

# The node's side of apulld's HTTP API: python3 (the node has no curl).
_API = """
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])
c = C("apulld", timeout=60)
body = sys.argv[4] if len(sys.argv) > 4 else None
c.request(sys.argv[2], sys.argv[3], body=body)
r = c.getresponse(); raw = r.read()
print(json.dumps({"status": r.status, "body": json.loads(raw) if raw else None}))
"""


def source_tar() -> bytes:
    """Many small files and one big one (the restart reads it), random content."""
    rng = random.Random(20261123)
    files = {f"small/f{i:02d}": rng.randbytes(rng.randrange(1, 48 << 10)) for i in range(24)}
    files["etc/motd"] = b"apull fscache\n"
    files[BIG] = rng.randbytes(BIG_SIZE)
    files["data/other"] = rng.randbytes(8 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("etc", "small", "data"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- the node -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> layout.LabNode:
    cfg = load_config(default_config_path())
    if cfg.target != "lab":
        pytest.skip("integration tests need TARGET=lab in config.txt")
    from apull.cli import lab_nodes

    found = {n.name: n for n in lab_nodes(cfg)}
    node1 = found.get("node1")
    if node1 is None or node1.variant != "ondemand":
        pytest.skip("needs lab node1 in the ondemand variant")
    if not nodes.NodeDir(node1).running():
        pytest.fail("lab node1 is not running (make lab-up)")
    return node1


def sh(node: layout.LabNode, command: str, timeout: float = 300) -> str:
    res = nodes.ssh(node, command, timeout=timeout)
    assert res.returncode == 0, f"{command}: {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@dataclass
class NodeApulld:
    node: layout.LabNode
    address: str

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        args = [self.address, method, path] + ([json.dumps(body)] if body is not None else [])
        out = sh(self.node, "python3 - " + shlex.join(args) + " <<'EOF'\n" + _API + "EOF\n")
        answer = json.loads(out.strip().splitlines()[-1])
        return int(answer["status"]), answer["body"]

    def ping(self) -> dict[str, Any]:
        status, body = self.api("GET", "/v1.0/apulld/ping")
        assert status == 200, body
        return dict(body)

    def stats(self) -> dict[str, int]:
        return dict(self.ping()["serving"]["stats"])

    def put(self, layer: Layer, blob_id: str, registry: str = "") -> dict[str, Any]:
        registry = registry or f"127.0.0.1:{TUNNEL_PORT}"
        config = layer.config(registry, blob_id=blob_id, fsid=blob_id)
        status, body = self.api("PUT", "/v1.0/apulld/blob_config", config)
        assert status == 201, body
        return dict(body)


def apull_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apull.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip


def render_unit() -> str:
    template = (ROOT / "roles/apull/templates/apulld.service.j2").read_text()
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined)
    text = env.from_string(template).render(ansible_managed="apull fscache test",
                                            apull_config_dir=TEST_DIR)  # fmt: skip
    # The deployed node-check is not there when the stack is not deployed.
    return "\n".join(line for line in text.splitlines() if "node-check" not in line) + "\n"


@pytest.fixture(scope="module")
def apulld(node: layout.LabNode) -> Iterator[NodeApulld]:
    """The deployed apulld on node1, else the role's unit with a test config."""
    state = sh(node, "systemctl is-active apulld || true; test -e /etc/systemd/system/"
                     "apulld.service && echo deployed || true; test -x /usr/bin/apulld "
                     "&& echo binary || true").split()  # fmt: skip
    ours = "deployed" not in state
    if ours:
        # A fresh node1 (CI): the node binaries, and the modules loaded with the fs_ctl gate
        # open (what the fscache role does), before a test unit of ours runs apulld.
        for step in (
            ("sync-bin", "node1", "--no-lab"),
            ("run", "fscache", "--no-lab", "-l", "node1"),
        ):
            done = apull_cli(*step)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert sh(node, "test -x /usr/bin/apulld && echo binary").strip() == "binary"
    if ours:
        config = (
            "version = 1\n[global]\nlog_level = \"debug\"\n[apulld]\nbackend = \"fscache\"\n"
            f"cache_dir = \"{TEST_CACHE}/cachefiles\"\nthread_num = 4\n"
            "registry_insecure = [\"registry.lab:5000\"]\nregistry_auth_file = \"\"\n"
            "fetch_retries = 1\nfetch_timeout_s = 10\n"
        )  # fmt: skip
        sh(node, f"mkdir -p {TEST_DIR} && cat > {TEST_DIR}/config.toml <<'EOF'\n{config}EOF\n"
                 f"cat > {RUNTIME_UNIT} <<'EOF'\n{render_unit()}EOF\n"
                 "systemctl daemon-reload && systemctl restart apulld")  # fmt: skip
    daemon = NodeApulld(node, "/run/apulld.sock")
    deadline = time.monotonic() + 240  # Python starts slowly under TCG, slower on a busy host
    while True:
        with contextlib.suppress(AssertionError):
            ping = daemon.ping()
            break
        assert time.monotonic() < deadline, sh(node, "journalctl -u apulld -n 40 --no-pager")
        time.sleep(1)
    assert ping["backend"] == "fscache", ping
    yield daemon
    if ours:
        sh(node, f"systemctl stop apulld; rm -f {RUNTIME_UNIT}; systemctl daemon-reload; "
                 f"systemctl reset-failed apulld 2>/dev/null; rm -rf {TEST_DIR} {TEST_CACHE} "
                 "/run/apulld.sock")  # fmt: skip


# -- the registry and the proxy the node sees -----------------------------------------------


@pytest.fixture(scope="module")
def layer() -> Layer:
    registry = RegistryClient(layout.host_registry())
    tar = source_tar()
    data = gzip.compress(tar, compresslevel=1, mtime=0)
    config = {
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }  # fmt: skip
    registry.push_image(REPO, "latest", Blob(OCI_CONFIG, json.dumps(config).encode()),
                        [Blob(OCI_LAYER_GZIP, data)])  # fmt: skip
    return convert_layer(registry, REPO, tar)


@pytest.fixture(scope="module")
def blob_bytes(layer: Layer) -> bytes:
    url = f"http://{layout.host_registry()}/v2/{layer.repo}/blobs/{layer.digest}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return bytes(resp.read())


@pytest.fixture(scope="module")
def proxy(node: layout.LabNode) -> Iterator[Proxy]:
    front = Proxy(layout.host_registry())
    tunnel = subprocess.Popen(
        ["ssh", *nodes.SSH_OPTIONS, "-i", str(layout.ssh_key_path()), "-p", str(node.ssh_port),
         "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5", "-N",
         "-R", f"127.0.0.1:{TUNNEL_PORT}:{front.address}", "root@127.0.0.1"],
    )  # fmt: skip
    probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {TUNNEL_PORT}))\""
    deadline = time.monotonic() + 60
    while nodes.ssh(node, probe, timeout=60).returncode != 0:
        assert tunnel.poll() is None, "ssh -R failed (port taken on node1?)"
        assert time.monotonic() < deadline, "the tunnel to the proxy did not come up"
        time.sleep(1)
    yield front
    tunnel.terminate()
    tunnel.wait(10)
    front.down()


@pytest.fixture(scope="module")
def mounted(node: layout.LabNode, apulld: NodeApulld) -> Iterator[list[tuple[str, str]]]:
    """Mounts made by the tests (mountpoint, blob_id): unmounted, blobs deleted at the end."""
    made: list[tuple[str, str]] = []
    yield made
    for target, blob_id in reversed(made):
        nodes.ssh(node, f"umount {target}; rmdir {target}", timeout=120)
        apulld.api("DELETE", f"/v1.0/apulld/blob_config?blob_id={blob_id}")
    nodes.ssh(node, f"rmdir {MOUNT_ROOT} 2>/dev/null", timeout=60)


def mount(node: layout.LabNode, mounted: list[tuple[str, str]], blob_id: str) -> str:
    target = f"{MOUNT_ROOT}/{blob_id}"
    sh(node, f"mkdir -p {target} && mount -t erofs none -o fsid={blob_id} {target}")
    mounted.append((target, blob_id))
    return target


def hashes(node: layout.LabNode, root: str, names: list[str]) -> dict[str, str]:
    out = sh(node, f"cd {root} && sha256sum " + " ".join(shlex.quote(n) for n in names))
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


def expected(layer: Layer, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256(layer.files[n]).hexdigest() for n in names}


def unique_id(tag: str, layer: Layer) -> str:
    """A fresh blob id (a new fscache cookie: an empty cache file) for the same blob."""
    return f"fsc-{tag}-{int(time.time())}-{layer.digest[7:19]}"


# -- the tests ------------------------------------------------------------------------------


def test_mounted_blob_reads_like_its_source_and_fetches_a_fraction(
    node, apulld, layer, proxy, mounted
) -> None:
    blob_id = unique_id("read", layer)
    before = apulld.stats()
    answer = apulld.put(layer, blob_id)
    assert answer["mount_options"] == f"fsid={blob_id}"
    target = mount(node, mounted, blob_id)
    line = sh(node, f"grep ' {target} ' /proc/mounts")
    assert " erofs " in line and f"fsid={blob_id}" in line, line

    small = [*sorted(n for n in layer.files if n.startswith("small/")), "etc/motd"]
    assert hashes(node, target, small) == expected(layer, small)
    ping = apulld.ping()["serving"]
    assert {"object_id": ping["objects"][0]["object_id"], "blob_id": blob_id} in ping["objects"]
    stats = ping["stats"]
    fetched = stats.get("bytes_fetched", 0) - before.get("bytes_fetched", 0)
    assert 0 < fetched < layer.size // 4, (fetched, layer.size)
    assert proxy.bytes_of(layer.digest) == fetched
    assert stats["read_requests"] > before.get("read_requests", 0)
    print(f"\nsmall files: {fetched} of {layer.size} blob bytes fetched "
          f"({100 * fetched / layer.size:.1f} %)")  # fmt: skip

    started = time.monotonic()
    assert hashes(node, target, ["data/other"]) == expected(layer, ["data/other"])
    took = time.monotonic() - started
    print(f"data/other: 8 MiB read cold in {took:.1f} s ({8 / took:.1f} MB/s)")
    started = time.monotonic()
    assert hashes(node, target, ["data/other"]) == expected(layer, ["data/other"])
    print(f"data/other again (kernel cache): {time.monotonic() - started:.1f} s")

    status, body = apulld.api("DELETE", f"/v1.0/apulld/blob_config?blob_id={blob_id}")
    assert status == 409, body


def test_read_speed_from_the_lab_registry(node, apulld, layer, mounted) -> None:
    """The same blob straight from registry.lab (no proxy, no ssh tunnel): a cold read of
    the big file, against fetching the whole blob with Python on the node."""
    blob_id = unique_id("speed", layer)
    apulld.put(layer, blob_id, registry=f"{layout.REGISTRY_NAME}:{layout.REGISTRY_PORT}")
    target = mount(node, mounted, blob_id)
    before = apulld.stats()
    started = time.monotonic()
    assert hashes(node, target, [BIG]) == expected(layer, [BIG])
    took = time.monotonic() - started
    stats = apulld.stats()
    requests = stats["fetch_requests"] - before.get("fetch_requests", 0)
    fetched = stats["bytes_fetched"] - before.get("bytes_fetched", 0)
    assert BIG_SIZE <= fetched < BIG_SIZE + (8 << 20)
    url = (
        f"http://{layout.REGISTRY_NAME}:{layout.REGISTRY_PORT}/v2/{layer.repo}/blobs/{layer.digest}"
    )
    fetch = f"t = time.monotonic(); urllib.request.urlopen('{url}').read()"
    whole = sh(node, f'python3 -c "import time, urllib.request; {fetch}; '
                     'print(time.monotonic() - t)"')  # fmt: skip
    print(f"\n{BIG}: {BIG_SIZE >> 20} MiB read cold in {took:.1f} s "
          f"({BIG_SIZE / took / 1e6:.1f} MB/s), {requests} range requests, {fetched} bytes; "
          f"the whole {layer.size} byte blob with urllib: "
          f"{layer.size / float(whole) / 1e6:.1f} MB/s")  # fmt: skip


def test_restart_in_the_middle_of_a_read(node, apulld, layer, proxy, mounted) -> None:
    proxy.reset()
    blob_id = unique_id("restart", layer)
    apulld.put(layer, blob_id)
    target = mount(node, mounted, blob_id)
    old_pid = apulld.ping()["pid"]
    proxy.state.delay = 0.5  # every range request takes a while: reads are in flight
    try:
        sh(node, f"(sha256sum {target}/{BIG} > /tmp/fsc-read.out 2>&1; echo $? > "
                 "/tmp/fsc-read.rc) >/dev/null 2>&1 &")  # fmt: skip
        deadline = time.monotonic() + 120
        while proxy.bytes_of(layer.digest) < (2 << 20):
            assert time.monotonic() < deadline, "the reader did not get going"
            time.sleep(0.5)
        started = time.monotonic()
        sh(node, "systemctl restart apulld")
        restart = time.monotonic() - started
    finally:
        proxy.state.delay = 0.0
    deadline = time.monotonic() + 600
    while "rc" not in sh(node, "test -e /tmp/fsc-read.rc && echo rc || true"):
        assert time.monotonic() < deadline, "the read did not finish after the restart"
        time.sleep(2)
    out = sh(node, "cat /tmp/fsc-read.rc /tmp/fsc-read.out; rm -f /tmp/fsc-read.*")
    code, digest = out.split()[0], out.split()[1]
    assert code == "0", out
    assert digest == hashlib.sha256(layer.files[BIG]).hexdigest()
    ping = apulld.ping()
    assert ping["pid"] != old_pid
    serving = ping["serving"]
    assert serving["resumed"] is True and serving["fd_stored"] is True, serving
    assert blob_id in [o["blob_id"] for o in serving["objects"]], serving
    print(f"\nrestart during a read: systemctl restart took {restart:.1f} s, the read of "
          f"{BIG_SIZE >> 20} MiB completed with the right bytes")  # fmt: skip


def test_a_corrupt_range_gives_eio_or_the_right_bytes(
    node, apulld, layer, proxy, mounted, blob_bytes
) -> None:
    sample = layer.files[BIG][BIG_SIZE // 2 : BIG_SIZE // 2 + 64]
    offset = blob_bytes.find(sample)
    assert offset > 0
    before = apulld.stats()

    # Spoiled every time: the file read fails with EIO, the rest of the image reads.
    bad_id = unique_id("bad", layer)
    apulld.put(layer, bad_id)
    bad = mount(node, mounted, bad_id)
    proxy.state.corrupt[layer.digest] = Corruption(offset, times=-1)
    try:
        res = nodes.ssh(node, f"cat {bad}/{BIG} | sha256sum; echo ${{PIPESTATUS[0]}}",
                        timeout=300)  # fmt: skip
    finally:
        proxy.state.corrupt.clear()
    status = res.stdout.split()[-1]
    assert status != "0" and "Input/output error" in res.stderr, (res.stdout, res.stderr)
    assert hashes(node, bad, ["etc/motd"]) == expected(layer, ["etc/motd"])
    after = apulld.stats()
    assert after["verify_giveups"] > before.get("verify_giveups", 0)
    assert after["read_errors"] > before.get("read_errors", 0)

    # Spoiled once: fetched again, the file reads right.
    once_id = unique_id("once", layer)
    apulld.put(layer, once_id)
    once = mount(node, mounted, once_id)
    proxy.state.corrupt[layer.digest] = Corruption(offset, times=1)
    try:
        assert hashes(node, once, [BIG]) == expected(layer, [BIG])
    finally:
        proxy.state.corrupt.clear()
    assert apulld.stats()["verify_failures"] > after["verify_failures"]


def test_a_crash_in_the_middle_of_a_read(node, apulld, layer, proxy, mounted) -> None:
    """SIGKILL while READs are taken: systemd starts apulld again (Restart=always) with the
    stored fds; `restore` makes the kernel resend what the dead one never answered."""
    proxy.reset()
    blob_id = unique_id("crash", layer)
    apulld.put(layer, blob_id)
    target = mount(node, mounted, blob_id)
    old_pid = apulld.ping()["pid"]
    proxy.state.delay = 0.5
    try:
        sh(node, f"(sha256sum {target}/data/other > /tmp/fsc-crash.out 2>&1; echo $? > "
                 "/tmp/fsc-crash.rc) >/dev/null 2>&1 &")  # fmt: skip
        deadline = time.monotonic() + 120
        while proxy.bytes_of(layer.digest) < (1 << 20):
            assert time.monotonic() < deadline, "the reader did not get going"
            time.sleep(0.5)
        sh(node, "systemctl kill -s KILL apulld")
    finally:
        proxy.state.delay = 0.0
    deadline = time.monotonic() + 600
    while "rc" not in sh(node, "test -e /tmp/fsc-crash.rc && echo rc || true"):
        assert time.monotonic() < deadline, "the read did not finish after the crash"
        time.sleep(2)
    out = sh(node, "cat /tmp/fsc-crash.rc /tmp/fsc-crash.out; rm -f /tmp/fsc-crash.*")
    assert out.split()[:2] == ["0", hashlib.sha256(layer.files["data/other"]).hexdigest()], out
    ping = apulld.ping()
    assert ping["pid"] != old_pid and ping["serving"]["resumed"] is True
    log = sh(node, f"journalctl -u apulld --no-pager -n 200 _PID={ping['pid']}")
    assert "restore sent" in log
