"""The snapshotter over gRPC, on a temporary socket and root: semantics, errors, persistence."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from node_support import stdlib_names

from apull_node.snapshotter.api import snapshots_pb2 as pb
from apull_node.snapshotter.api import snapshots_pb2_grpc as pb_grpc
from apull_node.snapshotter.errors import AlreadyExistsError, StepError
from apull_node.snapshotter.overlay import OverlaySnapshotter
from apull_node.snapshotter.server import SnapshotterServer
from apull_node.snapshotter.store import Kind

ACTIVE, VIEW, COMMITTED = pb.ACTIVE, pb.VIEW, pb.COMMITTED


class Served:
    """One snapshotter behind a real gRPC server, with a client stub."""

    def __init__(self, base: Path, hooks=()) -> None:
        self.base = base
        self.root = base / "root"
        self.address = str(base / "snap.sock")
        self.hooks = hooks
        self.start()

    def start(self) -> None:
        self.snapshotter = OverlaySnapshotter(self.root, self.hooks)
        self.server = SnapshotterServer(self.snapshotter, self.address)
        self.server.start()
        self.channel = grpc.insecure_channel(f"unix:{self.address}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=1)
        self.snapshotter.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    # Shorthands for the RPCs.
    def prepare(self, key, parent="", labels=None):
        request = pb.PrepareSnapshotRequest(snapshotter="apull", key=key, parent=parent)
        request.labels.update(labels or {})
        return list(self.stub.Prepare(request).mounts)

    def view(self, key, parent=""):
        return list(self.stub.View(pb.ViewSnapshotRequest(key=key, parent=parent)).mounts)

    def mounts(self, key):
        return list(self.stub.Mounts(pb.MountsRequest(key=key)).mounts)

    def commit(self, name, key, labels=None):
        request = pb.CommitSnapshotRequest(name=name, key=key)
        request.labels.update(labels or {})
        self.stub.Commit(request)

    def stat(self, key):
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def remove(self, key):
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    def usage(self, key):
        return self.stub.Usage(pb.UsageRequest(key=key))

    def update(self, name, labels, paths=None):
        request = pb.UpdateSnapshotRequest(info=pb.Info(name=name, labels=labels))
        if paths is not None:
            request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
        return self.stub.Update(request).info

    def list(self, *filters):
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=filters)) for i in r.info]

    def cleanup(self):
        self.stub.Cleanup(pb.CleanupRequest(snapshotter="apull"))

    def fs(self, snapshot_id):
        return self.root / "snapshots" / str(snapshot_id) / "fs"

    def layer(self, name, parent="", files=None):
        """Prepare, fill and commit a layer; return its directory id."""
        mounts = self.prepare(f"extract {name}", parent)
        upper = upperdir(mounts[0])
        for path, content in (files or {}).items():
            (upper / path).write_text(content)
        self.commit(name, f"extract {name}")
        return int(upper.parent.name)


def upperdir(mount) -> Path:
    if mount.type == "bind":
        return Path(mount.source)
    (value,) = [o.removeprefix("upperdir=") for o in mount.options if o.startswith("upperdir=")]
    return Path(value)


def option(mount, name):
    values = [o.split("=", 1)[1] for o in mount.options if o.startswith(name + "=")]
    return values[0] if values else None


@pytest.fixture
def short_tmp():
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    base = Path(tempfile.mkdtemp(prefix="apull-snap-", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def served(short_tmp):
    served = Served(short_tmp)
    yield served
    served.stop()


def code_of(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code()


# -- layout and modes


def test_root_socket_and_database_modes(served):
    assert stat.S_IMODE(served.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((served.root / "snapshots").stat().st_mode) == 0o700
    assert stat.S_IMODE((served.root / "metadata.db").stat().st_mode) == 0o600
    mode = os.stat(served.address).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_existing_root_with_loose_mode_is_tightened(short_tmp):
    root = short_tmp / "root"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    OverlaySnapshotter(root).close()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


# -- mounts


def test_prepare_without_parent_is_a_writable_bind_mount(served):
    (mount,) = served.prepare("k")
    assert mount.type == "bind"
    assert mount.options == ["rw", "rbind"]
    source = Path(mount.source)
    assert source.parent.parent == served.root / "snapshots"
    assert source.name == "fs" and source.is_dir()
    assert (source.parent / "work").is_dir()
    assert stat.S_IMODE(source.stat().st_mode) == 0o755
    assert served.mounts("k") == [mount]
    info = served.stat("k")
    assert (info.name, info.parent, info.kind) == ("k", "", ACTIVE)


def test_active_on_a_chain_is_an_overlay_newest_parent_first(served):
    base = served.layer("base")
    middle = served.layer("middle", "base")
    top = served.layer("top", "middle")
    (mount,) = served.prepare("container", "top")
    assert (mount.type, mount.source) == ("overlay", "overlay")
    upper = upperdir(mount)
    assert option(mount, "workdir") == str(upper.parent / "work")
    assert option(mount, "lowerdir") == ":".join(str(served.fs(i)) for i in (top, middle, base))
    # workdir and upperdir come before lowerdir, as containerd orders them.
    names = [o.split("=", 1)[0] for o in mount.options]
    assert names.index("lowerdir") > names.index("upperdir") > names.index("workdir")
    assert served.mounts("container") == [mount]
    assert served.stat("container").parent == "top"


def test_views(served):
    base = served.layer("base")
    top = served.layer("top", "base")
    (single,) = served.view("v1", "base")
    assert (single.type, single.source, list(single.options)) == (
        "bind",
        str(served.fs(base)),
        ["ro", "rbind"],
    )
    (double,) = served.view("v2", "top")
    assert double.type == "overlay"
    assert option(double, "lowerdir") == f"{served.fs(top)}:{served.fs(base)}"
    assert option(double, "upperdir") is None and option(double, "workdir") is None
    (empty,) = served.view("v0")
    assert empty.type == "bind" and list(empty.options) == ["ro", "rbind"]
    assert served.stat("v2").kind == VIEW


def test_directory_modes_do_not_depend_on_the_umask(short_tmp):
    old = os.umask(0o077)
    try:
        snapshotter = OverlaySnapshotter(short_tmp / "root")
        (mount,) = snapshotter.prepare("k", "", {})
        snapshotter.close()
    finally:
        os.umask(old)
    fs = Path(mount.source)
    assert stat.S_IMODE(fs.stat().st_mode) == 0o755
    assert stat.S_IMODE((fs.parent / "work").stat().st_mode) == 0o711


def test_a_prepare_hook_can_provide_the_target_layer_itself(short_tmp):
    """The extension point for remote layers: commit the target, answer AlreadyExists."""
    seen = []

    def remote_layer(snapshotter, request):
        seen.append((request.key, request.parent, request.target))
        if request.labels.get("example/remote") != "yes":
            return
        snapshotter.create(Kind.ACTIVE, request.key, request.parent, {})
        snapshotter.commit(request.target, request.key, request.labels)
        raise AlreadyExistsError(f"target snapshot {request.target!r}")

    served = Served(short_tmp, hooks=[remote_layer])
    try:
        labels = {"containerd.io/snapshot.ref": "sha256:layer", "example/remote": "yes"}
        code = code_of(served.prepare, "extract-1 sha256:layer", "", labels)
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert served.stat("sha256:layer").kind == COMMITTED
        # How containerd's metadata layer then finds the target it was told exists:
        query = 'labels."containerd.io/snapshot.ref"==sha256:layer,parent==""'
        assert [i.name for i in served.list(query)] == ["sha256:layer"]
        assert code_of(served.stat, "extract-1 sha256:layer") == grpc.StatusCode.NOT_FOUND
        served.prepare("ordinary")  # hooks that return let the ordinary Prepare run
        assert seen == [("extract-1 sha256:layer", "", "sha256:layer"), ("ordinary", "", "")]
    finally:
        served.stop()


# -- commit, usage, labels


def test_commit_renames_records_usage_and_replaces_labels(served):
    (mount,) = served.prepare("active", labels={"old": "1"})
    upper = Path(mount.source)
    (upper / "data").write_bytes(b"x" * 10000)
    (upper / "dir").mkdir()
    (upper / "dir" / "link").symlink_to("../data")
    os.link(upper / "data", upper / "hardlink")  # counted once
    live = served.usage("active")
    assert live.inodes == 4  # fs itself, data, dir, link
    assert live.size >= 10000
    served.commit("layer", "active", labels={"new": "2"})
    assert code_of(served.stat, "active") == grpc.StatusCode.NOT_FOUND
    info = served.stat("layer")
    assert (info.kind, dict(info.labels)) == (COMMITTED, {"new": "2"})
    assert info.created_at.ToNanoseconds() == info.updated_at.ToNanoseconds() > 0
    assert served.usage("layer") == live
    # The directory keeps its id: a child's lowerdir is the same fs.
    (child,) = served.prepare("child", "layer")
    assert option(child, "lowerdir") == str(upper)


def test_usage_of_a_view_is_zero(served):
    served.layer("base", files={"f": "content"})
    served.view("v", "base")
    usage = served.usage("v")
    assert (usage.size, usage.inodes) == (0, 0)


def test_update_labels_with_and_without_masks(served):
    served.prepare("k", labels={"a": "1", "b": "2"})
    created = served.stat("k").created_at.ToNanoseconds()
    info = served.update("k", {"b": "20", "c": "3"}, ["labels.b", "labels.a"])
    assert dict(info.labels) == {"b": "20"}  # "a" absent from the request: removed
    info = served.update("k", {"x": "1"}, ["labels"])
    assert dict(info.labels) == {"x": "1"}
    info = served.update("k", {"y": "2", "empty": ""})
    assert dict(info.labels) == {"y": "2"}
    assert info.created_at.ToNanoseconds() == created < info.updated_at.ToNanoseconds()
    assert dict(served.stat("k").labels) == {"y": "2"}


# -- list


def test_list_with_filters_like_containerd_sends(served):
    served.layer("base")
    served.prepare("unpack", "base", labels={"containerd.io/snapshot.ref": "sha256:top"})
    served.view("v", "base")
    assert {i.name for i in served.list()} == {"base", "unpack", "v"}
    assert [i.name for i in served.list("kind==committed")] == ["base"]
    assert {i.name for i in served.list("kind==view", "kind==active")} == {"v", "unpack"}
    query = 'labels."containerd.io/snapshot.ref"==sha256:top,parent=="base"'
    assert [i.name for i in served.list(query)] == ["unpack"]
    assert [i.name for i in served.list('parent==""')] == ["base"]
    assert code_of(served.list, "kind=") == grpc.StatusCode.INVALID_ARGUMENT


def test_list_streams_in_batches(served):
    for n in range(130):
        served.snapshotter.view(f"v{n:03}", "", {})
    responses = list(served.stub.List(pb.ListSnapshotsRequest()))
    assert [len(r.info) for r in responses] == [100, 30]
    assert [i.name for r in responses for i in r.info] == [f"v{n:03}" for n in range(130)]


# -- errors


def test_error_codes(served):
    served.layer("base")
    served.prepare("active", "base")
    codes = grpc.StatusCode
    assert code_of(served.prepare, "active") == codes.ALREADY_EXISTS
    assert code_of(served.prepare, "base") == codes.ALREADY_EXISTS
    assert code_of(served.prepare, "new", "missing") == codes.NOT_FOUND
    assert code_of(served.prepare, "new", "active") == codes.INVALID_ARGUMENT
    assert code_of(served.view, "new", "active") == codes.INVALID_ARGUMENT
    assert code_of(served.prepare, "") == codes.INVALID_ARGUMENT
    assert code_of(served.prepare, "big", labels={"k": "v" * 4096}) == codes.INVALID_ARGUMENT
    assert code_of(served.commit, "base", "active") == codes.ALREADY_EXISTS
    assert code_of(served.commit, "x", "missing") == codes.NOT_FOUND
    assert code_of(served.commit, "x", "base") == codes.FAILED_PRECONDITION
    assert code_of(served.mounts, "base") == codes.FAILED_PRECONDITION
    assert code_of(served.mounts, "missing") == codes.NOT_FOUND
    assert code_of(served.remove, "base") == codes.FAILED_PRECONDITION
    assert code_of(served.remove, "missing") == codes.NOT_FOUND
    assert code_of(served.stat, "missing") == codes.NOT_FOUND
    assert code_of(served.usage, "missing") == codes.NOT_FOUND
    assert code_of(served.update, "missing", {}) == codes.NOT_FOUND
    assert code_of(served.update, "base", {}, ["parent"]) == codes.INVALID_ARGUMENT
    # Nothing half-created by the failures: only the two real snapshot directories.
    assert len(os.listdir(served.root / "snapshots")) == 2


# -- remove and cleanup


def test_remove_deletes_the_directory_and_frees_the_parent(served):
    base = served.layer("base")
    (mount,) = served.prepare("child", "base")
    child_dir = upperdir(mount).parent
    served.remove("child")
    assert not child_dir.exists()
    assert code_of(served.stat, "child") == grpc.StatusCode.NOT_FOUND
    served.remove("base")
    assert not served.fs(base).exists()
    assert os.listdir(served.root / "snapshots") == []


def test_cleanup_removes_only_directories_without_metadata(served):
    kept = served.layer("kept", files={"f": "x"})
    snapshots = served.root / "snapshots"
    (snapshots / "999" / "fs").mkdir(parents=True)
    (snapshots / "new-crashed" / "fs").mkdir(parents=True)
    (snapshots / "stray-file").write_text("")
    served.cleanup()
    assert os.listdir(snapshots) == [str(kept)]
    assert (served.fs(kept) / "f").read_text() == "x"


def test_a_stale_directory_for_a_fresh_id_is_replaced(served):
    # A crash after the rename but before the record committed leaves snapshots/<next id>.
    stale = served.root / "snapshots" / "1"
    (stale / "fs").mkdir(parents=True)
    (stale / "fs" / "junk").write_text("")
    (mount,) = served.prepare("k")
    assert mount.source == str(stale / "fs")
    assert os.listdir(mount.source) == []


def test_temporary_directories_are_reaped_at_start(short_tmp):
    snapshots = short_tmp / "root" / "snapshots"
    for name in ("new-123", "rm-4-abcd"):
        (snapshots / name / "fs").mkdir(parents=True)
    (snapshots / "7" / "fs").mkdir(parents=True)  # not ours to judge at start: Cleanup's
    OverlaySnapshotter(short_tmp / "root").close()
    assert os.listdir(snapshots) == ["7"]


# -- persistence and concurrency


def test_metadata_survives_a_restart_and_ids_are_not_reused(served):
    served.layer("base", files={"f": "1"})
    served.prepare("active", "base", labels={"l": "v"})
    served.prepare("doomed")
    doomed_id = int(Path(served.mounts("doomed")[0].source).parent.name)
    served.remove("doomed")
    before = {i.name: i for i in served.list()}
    mounts = served.mounts("active")
    served.restart()
    assert {i.name: i for i in served.list()} == before
    assert served.mounts("active") == mounts
    (mount,) = served.prepare("fresh")
    assert int(Path(mount.source).parent.name) > doomed_id


def test_parallel_clients(served):
    errors = []

    def worker(n):
        try:
            for i in range(8):
                served.layer(f"w{n}-{i}", f"w{n}-{i - 1}" if i else "")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    infos = served.list("kind==committed")
    assert len(infos) == 48
    assert len(os.listdir(served.root / "snapshots")) == 48


# -- the service process


def _start_main(base: Path, *extra: str, config: str = "[global]\nlog_level = 'debug'\n"):
    (base / "config.toml").write_text(config)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(base / "notify.sock"))
    notify.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=str(base / "notify.sock"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apull_node.snapshotter.main",
            "--config",
            str(base / "config.toml"),
            "--address",
            str(base / "main.sock"),
            "--root",
            str(base / "root"),
            *extra,
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, notify


@pytest.mark.parametrize("signum", [15, 2])
def test_main_notifies_readiness_serves_and_stops_cleanly(short_tmp, signum):
    process, notify = _start_main(short_tmp)
    try:
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1")
        address = short_tmp / "main.sock"
        assert stat.S_IMODE(os.stat(address).st_mode) == 0o600  # already when READY came
        with grpc.insecure_channel(f"unix:{address}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            stub.Prepare(pb.PrepareSnapshotRequest(key="k"))
            assert [i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info] == ["k"]
        process.send_signal(signum)
        assert process.wait(20) == 0
        assert notify.recv(4096) == b"STOPPING=1"
        assert not address.exists()
        stderr = process.stderr.read()
        assert "DEBUG apull-snapshotter.service: Prepare" in stderr
        assert "stopping" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()


def test_main_refuses_a_socket_another_instance_serves(served, short_tmp):
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "apull_node.snapshotter.main",
            "--config",
            str(short_tmp / "absent.toml"),
            "--address",
            served.address,
            "--root",
            str(short_tmp / "other-root"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert process.returncode == 1
    assert "another process is listening" in process.stderr
    served.prepare("still-served")


def test_main_rejects_bad_settings(short_tmp):
    (short_tmp / "config.toml").write_text("[snapshotter]\nroot = 5\n")
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "apull_node.snapshotter.main",
            "--config",
            str(short_tmp / "config.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert process.returncode == 2
    assert "root: expected str" in process.stderr


def test_main_uses_settings_when_no_overrides(short_tmp):
    config = f'[snapshotter]\naddress = "{short_tmp}/from-settings.sock"\nroot = "{short_tmp}/r"\n'
    (short_tmp / "config.toml").write_text(config)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apull_node.snapshotter.main",
            "--config",
            str(short_tmp / "config.toml"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (short_tmp / "from-settings.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (short_tmp / "r" / "metadata.db").exists()
        process.terminate()
        assert process.wait(20) == 0
        assert not (short_tmp / "from-settings.sock").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_imports_only_the_standard_library_grpc_and_protobuf():
    # The snapshotter ships as a zipapp onto nodes without the suite's other dependencies.
    script = (
        "import sys; import apull_node.snapshotter.main, apull_node.snapshotter.server;"
        "print('\\n'.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, check=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    ).stdout.split()  # fmt: skip
    # grpcio's runtime: typing_extensions, its Cython module, and grpc_* packages it probes for.
    # Below 3.11, tomli (tomllib's backport, bundled) reads the settings.
    allowed_top = {"google", "typing_extensions", "cython_runtime", "__main__", "tomli"}
    stdlib = stdlib_names()
    foreign = [
        name
        for name in loaded
        if (top := name.split(".")[0]) not in stdlib
        and top not in allowed_top
        and not top.startswith(("grpc", "_cython_"))
        and name != "apull_node"
        and not name.startswith(("apull_node.service.", "apull_node.snapshotter."))
        and name not in ("apull_node.service", "apull_node.snapshotter")
    ]
    assert foreign == []


def test_a_failed_step_names_itself_and_leaves_nothing(short_tmp):
    """Prepare on a snapshots directory that cannot be written (a read-only tmpfs on top):
    the error names the step and the path, and no record is left behind."""
    snapshotter = OverlaySnapshotter(short_tmp / "root")
    snapshots = snapshotter.layout.snapshots
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(snapshots)], check=True)
    try:
        with pytest.raises(StepError) as err:
            snapshotter.prepare("k", "", {})
        assert str(err.value) == (
            f"creating a snapshot directory in {snapshots}: Read-only file system"
        )
        assert snapshotter.walk() == []
    finally:
        subprocess.run(["umount", str(snapshots)], check=True)
        snapshotter.close()


def test_main_refuses_a_root_on_overlayfs_and_says_where_to_put_it(short_tmp):
    """containerd would find out at the first container; we refuse to start."""
    layers = {name: short_tmp / name for name in ("lower", "upper", "work", "merged")}
    for path in layers.values():
        path.mkdir()
    options = f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(layers["merged"])],
                   check=True)  # fmt: skip
    try:
        root = layers["merged"] / "apull"
        process = subprocess.run(
            [sys.executable, "-m", "apull_node.snapshotter.main", "--config",
             str(short_tmp / "absent.toml"), "--root", str(root),
             "--address", str(short_tmp / "s.sock")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert process.returncode == 1
        assert (
            f"cannot start: {root} is on an overlay file system ({layers['merged']}), which "
            "cannot hold overlay upper and work directories: set [snapshotter] root to a "
            "directory on ext4 or xfs"
        ) in process.stderr
        assert not root.exists()  # refused before anything was created
    finally:
        subprocess.run(["umount", str(layers["merged"])], check=True)


def test_overlay_counts_when_registered_built_in_or_loadable_and_else_says_the_fix(tmp_path):
    """At boot overlay is often a module nobody has loaded yet (the snapshotter starts before
    containerd): a loadable module counts, since the first overlay mount loads it."""
    from apull_node.snapshotter.startup_checks import problems

    filesystems = tmp_path / "filesystems"
    filesystems.write_text("nodev\tsysfs\n\text4\n")
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    (modules / "modules.dep").write_text("kernel/fs/erofs/erofs.ko: kernel/fs/overlay.ko.bak\n")
    assert problems(tmp_path, str(filesystems), modules) == [
        "the kernel offers no overlay file system, built in or as a module: install the "
        "kernel's modules package (overlay.ko under /lib/modules/$(uname -r)), or boot a "
        "kernel built with CONFIG_OVERLAY_FS"
    ]
    (modules / "modules.dep").write_text("kernel/fs/overlayfs/overlay.ko.xz:\n")
    assert problems(tmp_path, str(filesystems), modules) == []
    (modules / "modules.dep").unlink()
    (modules / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    assert problems(tmp_path, str(filesystems), modules) == []
    (modules / "modules.builtin").unlink()
    filesystems.write_text("nodev\toverlay\n\text4\n")
    assert problems(tmp_path, str(filesystems), modules) == []


def test_this_kernel_offers_overlay():
    """The real node (or build root) this runs on: /proc/filesystems and its modules."""
    from apull_node.snapshotter.startup_checks import FILESYSTEMS, modules_dir, overlay_offered

    assert overlay_offered(FILESYSTEMS, modules_dir())
