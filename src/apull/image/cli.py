"""apull-image-build: convert OCI / Docker v2 images into apull images (EROFS layers).

    apull-image-build convert --source IMAGE --target IMAGE [--source-insecure]
        [--target-insecure] [--chunk-size N] [--work-dir DIR] [--platform OS/ARCH]
        [--auth-file FILE]

Progress goes to stderr, one line per layer; the last line on stdout is the target
manifest digest. Exit status: 0 converted, 1 conversion failed (the message says which
image, layer and step), 2 usage error. Runs as root (layers keep owners and devices).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from apull import __version__
from apull.image.convert import ConvertError, ConvertOptions, convert, short
from apull.image.format import DEFAULT_CHUNK_SIZE, check_chunk_size
from apull.image.reference import ImageRefError, parse_reference

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def chunk_size_arg(text: str) -> int:
    """Bytes, or with a K / M / G suffix (binary: 1M = 1048576)."""
    lowered = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = _SUFFIXES.get(lowered[-1:], 1)
    digits = lowered[:-1] if lowered[-1:] in _SUFFIXES else lowered
    try:
        return check_chunk_size(int(digits) * factor)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apull-image-build", description="build apull images (EROFS layers)"
    )
    parser.add_argument("--version", action="version", version=f"apull-image-build {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser(
        "convert",
        help="convert an image from a registry into an apull image in a registry",
        description="Read IMAGE (OCI or Docker v2; an index resolves to --platform), turn "
        "each layer into an EROFS blob with a chunk digest table, push the result.",
    )
    conv.add_argument("--source", required=True, metavar="IMAGE", help="image to convert")
    conv.add_argument("--target", required=True, metavar="IMAGE", help="where to push (tag)")
    conv.add_argument(
        "--source-insecure",
        action="store_true",
        help="source registry: HTTPS without certificate checks, or plain HTTP",
    )
    conv.add_argument(
        "--target-insecure",
        action="store_true",
        help="target registry: HTTPS without certificate checks, or plain HTTP",
    )
    conv.add_argument(
        "--chunk-size",
        type=chunk_size_arg,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="bytes per verified chunk: a power of two from 4096, K/M suffixes (default 1M)",
    )
    conv.add_argument(
        "--work-dir", type=Path, metavar="DIR", help="scratch space (default: $TMPDIR)"
    )
    conv.add_argument("--platform", default="linux/amd64", help="platform to pick from an index")
    conv.add_argument(
        "--auth-file",
        type=Path,
        metavar="FILE",
        help="docker-style auth file (default: $REGISTRY_AUTH_FILE, ~/.docker/config.json, ...)",
    )
    # The old tool's flags: its output was always an OCI manifest, as ours is.
    conv.add_argument("--oci", action="store_true", help=argparse.SUPPRESS)
    conv.add_argument("--oci-ref", action="store_true", help=argparse.SUPPRESS)
    return parser


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        source = parse_reference(args.source)
        target = parse_reference(args.target)
    except ImageRefError as exc:
        parser.error(str(exc))
    options = ConvertOptions(
        source=source,
        target=target,
        source_insecure=args.source_insecure,
        target_insecure=args.target_insecure,
        chunk_size=args.chunk_size,
        work_dir=args.work_dir,
        platform=args.platform,
        auth_file=args.auth_file,
    )
    started = time.monotonic()
    try:
        result = convert(options, _log)
    except ConvertError as exc:
        print(f"apull-image-build: {exc}", file=sys.stderr)
        return 1
    uploaded = sum(1 for layer in result.layers if layer.uploaded)
    _log(
        f"converted {source} -> {target} in {time.monotonic() - started:.1f}s: "
        f"{len(result.layers)} layers ({uploaded} uploaded), manifest "
        f"{short(result.manifest_digest)}"
    )
    print(result.manifest_digest, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
