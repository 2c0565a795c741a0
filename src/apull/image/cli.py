"""apull-image-build: convert OCI / Docker v2 images into apull images (EROFS layers).

    apull-image-build convert --source IMAGE --target IMAGE [--source-insecure]
        [--target-insecure] [--chunk-size N] [--work-dir DIR] [--platform OS/ARCH]
        [--auth-file FILE] [--skip-if-current | --check] [--json]

Progress goes to stderr, one line per layer; the last line on stdout is the target
manifest digest (with --json: one JSON object saying what was done, see `summary`).
--skip-if-current converts only when the target is not already what converting would push
(its manifest records the source manifest, format, builder and chunk size, and its blobs are
there); --check only says whether it would convert (reads, needs no root). Exit status:
0 converted, current or checked, 1 failed (the message says which image, layer and step),
2 usage error. Converting runs as root (layers keep owners and devices).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from apull import __version__
from apull.image.convert import (
    ConvertError,
    ConvertOptions,
    ConvertResult,
    TargetState,
    convert,
    human_size,
    short,
    target_state,
)
from apull_node.image.format import DEFAULT_CHUNK_SIZE, check_chunk_size
from apull_node.image.reference import ImageRefError, parse_reference

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
    when = conv.add_mutually_exclusive_group()
    when.add_argument(
        "--skip-if-current",
        action="store_true",
        help="do nothing when the target already is this source's conversion",
    )
    when.add_argument(
        "--check",
        action="store_true",
        help="only say whether the target is current or would be converted",
    )
    conv.add_argument(
        "--json", action="store_true", help="print a JSON summary on stdout instead of the digest"
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
    state: TargetState | None = None
    result: ConvertResult | None = None
    try:
        if args.check or args.skip_if_current:
            state = target_state(options)
            verdict = "current" if state.current else "would convert"
            _log(f"{target}: {verdict}: {state.reason}")
        if not (args.check or (state is not None and state.current)):
            result = convert(options, _log)
    except ConvertError as exc:
        print(f"apull-image-build: {exc}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    if result is not None:
        uploaded = sum(1 for layer in result.layers if layer.uploaded)
        _log(
            f"converted {source} -> {target} in {seconds:.1f}s: "
            f"{len(result.layers)} layers ({uploaded} uploaded), "
            f"{human_size(sum(r.source.size for r in result.layers))} -> "
            f"{human_size(sum(r.layer.size for r in result.layers))}, "
            f"manifest {short(result.manifest_digest)}"
        )
    if args.json:
        print(json.dumps(summary(args.source, args.target, seconds, state, result)), flush=True)
    elif result is not None:
        print(result.manifest_digest, flush=True)
    elif state is not None:
        print(state.target_manifest if state.current else "", flush=True)
    return 0


def summary(
    source: str,
    target: str,
    seconds: float,
    state: TargetState | None,
    result: ConvertResult | None,
) -> dict[str, object]:
    """What --json prints: status converted, current or would convert, and the figures."""
    out: dict[str, object] = {"source": source, "target": target, "seconds": round(seconds, 2)}
    if result is not None:
        out.update(
            status="converted",
            reason=state.reason if state is not None else "converted unconditionally",
            source_manifest=result.source_manifest,
            target_manifest=result.manifest_digest,
            previous_target_manifest=state.target_manifest if state is not None else "",
            layers=len(result.layers),
            layers_uploaded=sum(1 for layer in result.layers if layer.uploaded),
            source_bytes=sum(layer.source.size for layer in result.layers),
            target_bytes=sum(layer.layer.size for layer in result.layers),
        )
    elif state is not None:
        out.update(
            status="current" if state.current else "would convert",
            reason=state.reason,
            source_manifest=state.source_manifest,
            target_manifest=state.target_manifest,
            previous_target_manifest=state.target_manifest,
            layers=state.layers,
            layers_uploaded=0,
            source_bytes=state.source_bytes,
            target_bytes=state.target_bytes,
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
