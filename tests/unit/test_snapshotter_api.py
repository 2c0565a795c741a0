"""Our .proto files: generation, and the wire contract against containerd's own definitions."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from apull_node.snapshotter.api import generate

GOCODE = Path("/usr/share/gocode/src")
CONTAINERD_PROTOS = [
    "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
    "github.com/containerd/containerd/api/types/mount.proto",
    "github.com/containerd/containerd/api/services/content/v1/content.proto",
]
#: Packages of which we carry only the calls we make (content: Read): each of ours must be
#: theirs exactly; the rest of theirs we do not use.
SUBSETS = {"containerd.services.content.v1"}


def test_generate_writes_importable_stubs_and_is_idempotent(tmp_path):
    first = generate.generate(tmp_path)
    names = sorted(p.name for p in first)
    assert {
        "mount_pb2.py",
        "snapshots_pb2.py",
        "snapshots_pb2_grpc.py",
        "snapshots_pb2.pyi",
    } <= set(names)
    assert {p.parent for p in first} == {
        tmp_path / "apull_node/snapshotter/api",
        tmp_path / "apull_node/cri/api",
    }
    stamps = {p: p.stat().st_mtime_ns for p in first}
    second = generate.generate(tmp_path)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second} == stamps  # unchanged files not rewritten
    grpc_module = (tmp_path / "apull_node/snapshotter/api/snapshots_pb2_grpc.py").read_text()
    assert "from apull_node.snapshotter.api import snapshots_pb2" in grpc_module


def test_generate_runs_as_a_module(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "apull_node.snapshotter.api.generate", "--out-root", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(tmp_path / "apull_node/snapshotter/api/snapshots_pb2.py") in result.stdout.split()


def _descriptors(tmp_path: Path, name: str, includes: list[Path], protos: list[str]):
    out = tmp_path / f"{name}.pb"
    args = ["protoc", *(f"-I{i}" for i in includes), f"--descriptor_set_out={out}"]
    assert protoc.main([*args, "--include_imports", *protos]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {f.package: f for f in files if f.package.startswith("containerd.")}


def _contract(file):
    """What goes on the wire: messages, fields, enums and methods, by full name."""
    messages = {}

    def visit(prefix, message):
        full = f"{prefix}.{message.name}"
        messages[full] = sorted(
            (f.number, f.name, f.type, f.label, f.type_name.lstrip(".")) for f in message.field
        )
        for nested in message.nested_type:
            visit(full, nested)

    for message in file.message_type:
        visit(file.package, message)
    enums = {
        f"{file.package}.{e.name}": sorted((v.number, v.name) for v in e.value)
        for e in file.enum_type
    }
    methods = {
        f"{file.package}.{s.name}/{m.name}": (
            m.input_type.lstrip("."),
            m.output_type.lstrip("."),
            m.client_streaming,
            m.server_streaming,
        )
        for s in file.service
        for m in s.method
    }
    return messages, enums, methods


@pytest.mark.skipif(
    not (GOCODE / CONTAINERD_PROTOS[0]).exists(),
    reason="containerd's .proto files are not installed (golang-github-containerd-containerd-dev)",
)
def test_wire_contract_matches_containerd(tmp_path):
    well_known = Path(str(resources.files("grpc_tools") / "_proto"))
    theirs = _descriptors(
        tmp_path,
        "containerd",
        [GOCODE, GOCODE / "github.com/gogo/protobuf", well_known],
        CONTAINERD_PROTOS,
    )
    ours = _descriptors(
        tmp_path,
        "ours",
        [generate.SRC_ROOT, well_known],
        [str(generate.PROTO_PACKAGE / name) for name in generate.PROTOS],
    )
    assert (
        sorted(ours)
        == sorted(theirs)
        == [
            "containerd.services.content.v1",
            "containerd.services.snapshots.v1",
            "containerd.types",
        ]
    )
    for package in theirs:
        mine, real = _contract(ours[package]), _contract(theirs[package])
        if package in SUBSETS:
            assert mine[0] and mine[2], package  # some messages and methods
            for part_of_mine, part_of_real in zip(mine, real, strict=True):
                for name, shape in part_of_mine.items():
                    assert part_of_real.get(name) == shape, f"{package}: {name}"
        else:
            assert mine == real, package
