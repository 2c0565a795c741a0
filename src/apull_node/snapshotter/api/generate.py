"""Generate the Python gRPC stubs from our .proto files (needs grpcio-tools).

Every package with protos is listed in PACKAGES: the snapshotter's API and the CRI image
client's (apull_node.cri.api). protoc runs with `-I <src>` so the generated modules import each
other by package (`apull_node.snapshotter.api.*`). Files are written only when their content
changes, so running it again is a no-op (and keeps mtimes stable for make).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
SRC_ROOT = API_DIR.parents[2]
PROTO_PACKAGE = API_DIR.relative_to(SRC_ROOT)  # apull_node/snapshotter/api
PROTOS = ("mount.proto", "snapshots.proto", "content.proto")
#: Every package's .proto files (package paths relative to src/); stubs go next to them.
PACKAGES: dict[Path, tuple[str, ...]] = {
    PROTO_PACKAGE: PROTOS,
    Path("apull_node/cri/api"): ("images.proto",),
}


class GenerateError(Exception):
    """protoc failed; the message carries its exit status."""


def _well_known_include() -> str:
    """grpc_tools' bundled google/protobuf/*.proto (Empty, Timestamp, FieldMask)."""
    return str(resources.files("grpc_tools") / "_proto")


def generate(out_root: Path | None = None) -> list[Path]:
    """Write the stubs under `out_root` (default: next to the protos); return every output."""
    from grpc_tools import protoc  # only the build needs grpcio-tools

    with tempfile.TemporaryDirectory(prefix="apull-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{SRC_ROOT}",
            f"-I{_well_known_include()}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(package / name) for package, names in PACKAGES.items() for name in names),
        ]
        status = protoc.main(args)
        if status != 0:
            raise GenerateError(f"protoc exited with status {status}: {' '.join(args)}")
        outputs = []
        for package in PACKAGES:
            target = (out_root or SRC_ROOT) / package
            target.mkdir(parents=True, exist_ok=True)
            for produced in sorted((Path(tmp) / package).iterdir()):
                dest = target / produced.name
                content = produced.read_bytes()
                if not dest.exists() or dest.read_bytes() != content:
                    dest.write_bytes(content)
                outputs.append(dest)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-root",
        type=Path,
        help="directory that receives apull/*/api/*_pb2*.py (default: the source tree)",
    )
    args = parser.parse_args(argv)
    try:
        for path in generate(args.out_root):
            print(path)
    except GenerateError as err:
        print(f"generate: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
