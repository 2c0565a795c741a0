"""The sync engine with the real node scripts, run by sh against temp paths on this host."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from apull.bundle.artefacts import ANY, SUPPORTED, BuiltBinary, Bundle, NodePlatform, Serves
from apull.sync.engine import NodeSyncError, sync_node
from apull.sync.plan import Action, StateParseError, parse_state


class LocalTransport:
    """Runs the scripts with sh here; "uploads" are copies (counted)."""

    def __init__(
        self, uploads_as_root: bool = True, corrupt: bool = False, path: str | None = None
    ) -> None:
        self.uploads_as_root = uploads_as_root
        self.corrupt = corrupt
        self.uploads: list[str] = []
        self.scripts = 0
        #: PATH for the scripts (a directory of stand-in commands first, to fake a platform).
        self.env = dict(os.environ, PATH=path) if path else None

    def run_script(self, script: str) -> str:
        self.scripts += 1
        run = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=self.env)
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
        return run.stdout

    def upload(self, local: Path, remote: str) -> None:
        self.uploads.append(Path(remote).name)
        shutil.copyfile(local, remote)
        if self.corrupt:
            with open(remote, "ab") as f:
                f.write(b"!")

    def scratch_path(self, name: str) -> str:
        return f"/tmp/{name}-{id(self)}"


def make_bundle(
    tmp_path: Path, contents: dict[str, bytes], platforms: dict[str, Serves] | None = None
) -> Bundle:
    """A bundle of `contents` (name -> bytes) for every node, or per platform directory:
    `platforms` maps a directory to what it serves, and each gets `contents` + its name."""
    src = tmp_path / "bundle"
    node = tmp_path / "node"
    (node / "bin").mkdir(parents=True, exist_ok=True)
    binaries = []
    for key, serves in (platforms or {ANY: SUPPORTED}).items():
        for name, base in contents.items():
            data = base if platforms is None else base + key.encode()
            (src / key).mkdir(parents=True, exist_ok=True)
            (src / key / name).write_bytes(data)
            binaries.append(_built(name, data, node, key, serves))
    return Bundle(src, "test", "f" * 64, tuple(binaries))


def _built(name: str, data: bytes, node: Path, key: str, serves: Serves) -> BuiltBinary:
    return BuiltBinary(
        name=name,
        install_path=str(node / "bin" / name),
        mode="0550",
        service=f"{name}-test.service",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        previous_dir=str(node / "previous"),
        platform=key,
        serves=serves,
    )


def faked_path(tmp_path: Path, uname_m: str | None = None, glibc: str | None = None) -> str:
    """PATH with stand-ins for `uname -m` and `getconf GNU_LIBC_VERSION` in front."""
    fakes = tmp_path / "fake-bin"
    fakes.mkdir(exist_ok=True)
    if uname_m is not None:
        (fakes / "uname").write_text(f"#!/bin/sh\necho {uname_m}\n")
    if glibc is not None:
        (fakes / "getconf").write_text(f"#!/bin/sh\necho 'glibc {glibc}'\n")
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    return f"{fakes}:{os.environ['PATH']}"


def host_python() -> str:
    """/usr/bin/python3's X.Y (what the probe reads here)."""
    run = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return run.stdout.strip()


def installed(bundle: Bundle, name: str) -> bytes:
    b = next(b for b in bundle.binaries if b.name == name)
    return Path(b.install_path).read_bytes()


def test_first_sync_then_nothing_then_one_file_then_rollback(tmp_path: Path) -> None:
    v1 = make_bundle(tmp_path, {"a": b"a-one", "b": b"b-one"})
    t = LocalTransport()
    first = sync_node(t, v1)
    assert [s.action for s in first.steps] == [Action.INSTALL, Action.INSTALL]
    assert sorted(t.uploads) == [".a.apull-new", ".b.apull-new"]
    assert installed(v1, "a") == b"a-one"
    mode = Path(v1.binaries[0].install_path).stat().st_mode & 0o777
    assert mode == 0o550

    t = LocalTransport()
    again = sync_node(t, v1)
    assert not again.changed and t.uploads == [] and t.scripts == 1

    v2 = make_bundle(tmp_path, {"a": b"a-two", "b": b"b-one"})
    inode_b = Path(v2.binaries[1].install_path).stat().st_ino
    t = LocalTransport()
    one = sync_node(t, v2)
    assert [s.action for s in one.steps] == [Action.UPDATE, Action.UNCHANGED]
    assert t.uploads == [".a.apull-new"]
    assert installed(v2, "a") == b"a-two"
    assert Path(v2.binaries[1].install_path).stat().st_ino == inode_b  # untouched
    assert Path(v2.binaries[0].previous_path).read_bytes() == b"a-one"

    back = sync_node(LocalTransport(), v2, rollback=True)
    assert [s.action for s in back.steps] == [Action.ROLLBACK, Action.NO_PREVIOUS]
    assert installed(v2, "a") == b"a-one"
    # a second rollback rolls forward again (current and previous swap)
    sync_node(LocalTransport(), v2, rollback=True)
    assert installed(v2, "a") == b"a-two"


def test_check_mode_changes_nothing(tmp_path: Path) -> None:
    v1 = make_bundle(tmp_path, {"a": b"one"})
    t = LocalTransport()
    result = sync_node(t, v1, check=True)
    assert result.changed
    assert t.uploads == []
    assert not Path(v1.binaries[0].install_path).exists()


def test_a_corrupted_upload_is_refused_and_the_old_binary_stays(tmp_path: Path) -> None:
    v1 = make_bundle(tmp_path, {"a": b"one"})
    sync_node(LocalTransport(), v1)
    v2 = make_bundle(tmp_path, {"a": b"two"})
    with pytest.raises(RuntimeError, match="upload corrupted"):
        sync_node(LocalTransport(corrupt=True), v2)
    assert installed(v2, "a") == b"one"
    leftovers = [p.name for p in Path(v2.binaries[0].install_path).parent.iterdir()]
    assert leftovers == ["a"]


def test_uploads_not_made_as_root_go_through_scratch(tmp_path: Path) -> None:
    v1 = make_bundle(tmp_path, {"a": b"one"})
    t = LocalTransport(uploads_as_root=False)
    sync_node(t, v1)
    assert t.uploads[0].startswith(".apull-a.upload")
    assert installed(v1, "a") == b"one"


def test_a_node_that_does_not_confirm_is_an_error(tmp_path: Path) -> None:
    v1 = make_bundle(tmp_path, {"a": b"one"})
    broken = replace(v1.binaries[0], mode="not-a-mode")
    bundle = replace(v1, binaries=(broken,))
    with pytest.raises((NodeSyncError, RuntimeError)):
        sync_node(LocalTransport(), bundle)


def test_state_output_is_checked(tmp_path: Path) -> None:
    v1 = make_bundle(tmp_path, {"a": b"one"})
    with pytest.raises(StateParseError, match="did not report a"):
        parse_state("--apull--\n", v1.names)
    with pytest.raises(StateParseError, match="unexpected line"):
        parse_state("--apull--\nnonsense\n", v1.names)
    with pytest.raises(StateParseError, match="did not report its platform"):
        parse_state("--apull--\na\t-\t-\tinactive\n", v1.names)
    node, state = parse_state(
        "motd noise\n--apull--\nplatform\tx86_64\t2.36\t3.11\na\t-\t-\tinactive\n", v1.names
    )
    assert state["a"].installed == "-"
    assert node == NodePlatform("x86_64", "2.36", "3.11")


def test_the_probe_reports_this_host() -> None:
    t = LocalTransport()
    from apull.sync import remote_scripts
    from apull.sync.remote_scripts import parse_platform

    lines = remote_scripts.after_marker(t.run_script(remote_scripts.platform_script()))
    node = parse_platform(lines[0])
    assert node == NodePlatform(
        platform.machine(), os.confstr("CS_GNU_LIBC_VERSION").split()[1], host_python()
    )


def test_each_node_gets_the_artefact_of_its_platform(tmp_path: Path) -> None:
    py = host_python()
    platforms = {
        f"x86_64-{py}": Serves(("x86_64",), (py,)),
        f"aarch64-{py}": Serves(("aarch64",), (py,)),
    }
    bundle = make_bundle(tmp_path, {"a": b"a-"}, platforms)
    result = sync_node(LocalTransport(path=faked_path(tmp_path, uname_m="aarch64")), bundle)
    assert result.platform is not None and result.platform.arch == "aarch64"
    assert [s.binary.platform for s in result.steps] == [f"aarch64-{py}"]
    assert installed(bundle, "a") == f"a-aarch64-{py}".encode()
    # The same node as x86-64 gets the other artefact: an update, not "unchanged".
    again = sync_node(LocalTransport(path=faked_path(tmp_path, uname_m="x86_64")), bundle)
    assert [s.action for s in again.steps] == [Action.UPDATE]
    assert Path(bundle.binaries[0].install_path).read_bytes() == f"a-x86_64-{py}".encode()


@pytest.mark.parametrize(
    ("uname_m", "glibc", "said"),
    [
        ("ppc64le", None, "it has ppc64le, glibc "),
        (None, "2.12", ", glibc 2.12, python3 "),
    ],
)
def test_a_node_no_artefact_serves_is_refused_before_anything_is_sent(
    tmp_path: Path, uname_m: str | None, glibc: str | None, said: str
) -> None:
    bundle = make_bundle(tmp_path, {"a": b"one"})
    t = LocalTransport(path=faked_path(tmp_path, uname_m=uname_m, glibc=glibc))
    with pytest.raises(NodeSyncError) as err:
        sync_node(t, bundle)
    assert said in str(err.value)
    assert "supported: x86_64 or aarch64, glibc >= 2.17, python3 3.9-3.13" in str(err.value)
    assert t.uploads == [] and t.scripts == 1
    assert not Path(bundle.binaries[0].install_path).exists()
