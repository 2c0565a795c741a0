"""A small converted image for the lazy-pull tests on the lab: busybox, a few small files and
two big random files, pushed to the lab registry and converted with apull-image-build, for
amd64 or arm64 nodes; and the check that a node runs it lazily over fscache."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from typing import Any

from conftest import run_on

from apull.image.convert import ConvertOptions, convert
from apull.lab import layout, nodes, test_image
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient
from apull_node.image.reference import parse_reference

REPO = "test/lazy"
CRI = "/usr/bin/apull-containerd-grpc cri"
K8S_CTR = "ctr -n k8s.io"
_PING = (
    'python3 -c "import http.client, json, socket\n'
    "class C(http.client.HTTPConnection):\n"
    "    def connect(self):\n"
    "        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect('/run/apulld.sock')\n"
    "c = C('apulld', timeout=60); c.request('GET', '/v1.0/apulld/ping')\n"
    'print(c.getresponse().read().decode())"'
)
BIG = "data/big"
OTHER = "data/other"


@dataclass(frozen=True)
class LazyImage:
    ref: str  # as the nodes name it (registry.lab:5000/...)
    files: dict[str, bytes]
    erofs_bytes: int  # sum of the converted layer blobs

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


def _data_tar() -> tuple[bytes, dict[str, bytes]]:
    rng = random.Random(20261124)
    files = {f"data/small{i}": rng.randbytes(rng.randrange(100, 20000)) for i in range(8)}
    files["data/hello"] = b"hello from a lazily pulled layer\n"
    files[BIG] = rng.randbytes(40 << 20)
    files[OTHER] = rng.randbytes(8 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), files


def push_and_convert(arch: str = "amd64") -> LazyImage:
    """The lazy image for `arch` (Debian's name), pushed and converted; test/lazy for amd64,
    test/lazy-ARCH for another."""
    repo = REPO if arch == "amd64" else f"{REPO}-{arch}"
    client = RegistryClient(layout.host_registry())
    _, base = test_image.build(arch)
    data_tar, files = _data_tar()
    data = Blob(OCI_LAYER_GZIP, gzip.compress(data_tar, compresslevel=1, mtime=0))
    diff_ids = [
        "sha256:" + hashlib.sha256(gzip.decompress(base.data)).hexdigest(),
        "sha256:" + hashlib.sha256(data_tar).hexdigest(),
    ]
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_blob = Blob(OCI_CONFIG, json.dumps(config, sort_keys=True).encode())
    client.push_image(repo, "latest", config_blob, [base, data])
    host = layout.host_registry()
    result = convert(
        ConvertOptions(
            source=parse_reference(f"{host}/{repo}:latest"),
            target=parse_reference(f"{host}/{repo}:apull"),
            source_insecure=True,
            target_insecure=True,
            platform=f"linux/{arch}",
        )
    )
    return LazyImage(
        ref=f"{layout.guest_registry()}/{repo}:apull",
        files=files,
        erofs_bytes=sum(layer.layer.size for layer in result.layers),
    )


def apulld_ping(node: layout.LabNode) -> dict[str, Any]:
    res = run_on(node, _PING)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def fetched(node: layout.LabNode) -> int:
    return int(apulld_ping(node)["serving"]["stats"].get("bytes_fetched", 0))


def forget_image(node: layout.LabNode, ref: str) -> None:
    """The image gone, its snapshots collected (a synchronous GC), apulld's caches wiped (the
    kernel's cache files, and apulld's own chunks)."""
    run_on(node, f"{CRI} rmi {ref} >/dev/null; {K8S_CTR} leases create --id lazy-gc >/dev/null "
                 f"&& {K8S_CTR} leases rm --sync lazy-gc")  # fmt: skip
    data = "/var/lib/containerd-apull"
    wiped = run_on(node, f"systemctl stop apulld && rm -rf {data}/cachefiles {data}/apulld/chunks "
                         "&& systemctl start apulld")  # fmt: skip
    assert wiped.returncode == 0, wiped.stderr


def run_lazily(node: layout.LabNode, image: LazyImage, container: str) -> int:
    """Pull `image` cold through CRI and run a container that reads one small file; check it
    printed that file, that each layer is an erofs mount over fscache (`fsid=`), and that only
    a small part of the image was fetched. Returns the bytes fetched."""
    forget_image(node, image.ref)  # cold, even when an earlier run left it cached
    assert apulld_ping(node)["backend"] == "fscache"
    before = fetched(node)
    pull = nodes.ssh(node, f"{CRI} pull --json {image.ref}", timeout=300)
    assert pull.returncode == 0, pull.stderr
    run = run_on(
        node, f"{K8S_CTR} run --rm --snapshotter apull {image.ref} {container} cat /data/hello"
    )
    assert run.stdout == image.files["data/hello"].decode(), run.stderr
    mounts = run_on(node, "grep ' erofs ' /proc/mounts").stdout.splitlines()
    ours = [m for m in mounts if "/var/lib/containerd-apull/snapshots/" in m]
    assert len(ours) >= 2 and all("fsid=" in m for m in ours), mounts
    got = fetched(node) - before
    share = 100 * got / image.erofs_bytes
    seconds = json.loads(pull.stdout)["seconds"]
    print(f"{node.name}: pull {seconds} s; fetched {got} of {image.erofs_bytes} ({share:.1f}%)")
    assert 0 < got < 0.15 * image.erofs_bytes
    return got
