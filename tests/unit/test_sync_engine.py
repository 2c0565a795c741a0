"""The sync engine with the real node scripts, run by sh against temp paths on this host."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from apull.bundle.artefacts import BuiltBinary, Bundle
from apull.sync.engine import NodeSyncError, sync_node
from apull.sync.plan import Action, StateParseError, parse_state


class LocalTransport:
    """Runs the scripts with sh here; "uploads" are copies (counted)."""

    def __init__(self, uploads_as_root: bool = True, corrupt: bool = False) -> None:
        self.uploads_as_root = uploads_as_root
        self.corrupt = corrupt
        self.uploads: list[str] = []
        self.scripts = 0

    def run_script(self, script: str) -> str:
        self.scripts += 1
        run = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
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


def make_bundle(tmp_path: Path, contents: dict[str, bytes]) -> Bundle:
    src = tmp_path / "bundle"
    src.mkdir(exist_ok=True)
    node = tmp_path / "node"
    (node / "bin").mkdir(parents=True, exist_ok=True)
    binaries = []
    for name, data in contents.items():
        (src / name).write_bytes(data)
        binaries.append(
            BuiltBinary(
                name=name,
                install_path=str(node / "bin" / name),
                mode="0550",
                service=f"{name}-test.service",
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                previous_dir=str(node / "previous"),
            )
        )
    return Bundle(src, "test", "f" * 64, "3.11", tuple(binaries))


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
        parse_state("--apull--\n", v1.binaries)
    with pytest.raises(StateParseError, match="unexpected line"):
        parse_state("--apull--\nnonsense\n", v1.binaries)
    state = parse_state("motd noise\n--apull--\na\t-\t-\tinactive\n", v1.binaries)
    assert state["a"].installed == "-"
