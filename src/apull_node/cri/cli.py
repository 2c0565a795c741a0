"""The `cri` command: pull, remove, list and inspect images through containerd's CRI plugin.

The same code runs as `apull cri ...` on the controller and `apull-containerd-grpc cri ...` on
a node (where only the bundled binaries exist):

    apull-containerd-grpc cri pull registry.lab:5000/lab/busybox:latest
    apull-containerd-grpc cri pull --json IMAGE        # one JSON line, for scripts and benches
    apull-containerd-grpc cri rmi IMAGE [IMAGE ...]
    apull-containerd-grpc cri ls
    apull-containerd-grpc cri status IMAGE             # exit status 1 when absent

Exit status: 0 done, 1 containerd said no (or the image is absent, for `status`), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from apull_node.cri.client import (
    DEFAULT_ADDRESS,
    DEFAULT_PULL_TIMEOUT,
    DEFAULT_TIMEOUT,
    Auth,
    CriError,
    ImageClient,
    ImageInfo,
)


def _creds(value: str) -> Auth:
    user, sep, password = value.partition(":")
    if not user or not sep:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return Auth(username=user, password=password)


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="images through containerd's CRI plugin (namespace k8s.io)"
    )
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"containerd's socket (default {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds per call (default {DEFAULT_PULL_TIMEOUT:g} for pull, "
        f"{DEFAULT_TIMEOUT:g} otherwise)",
    )
    sub = p.add_subparsers(dest="action", required=True)
    pull = sub.add_parser("pull", help="pull and unpack an image as kubelet would")
    pull.add_argument("image")
    pull.add_argument(
        "--creds",
        type=_creds,
        help="USER:PASSWORD for the registry (seen by `ps`: prefer a pull without it)",
    )
    pull.add_argument("--json", action="store_true", help="print one JSON object")
    rmi = sub.add_parser("rmi", help="remove images (absent ones are not an error)")
    rmi.add_argument("images", nargs="+", metavar="IMAGE")
    ls = sub.add_parser("ls", help="list the images CRI knows")
    ls.add_argument("--json", action="store_true", help="print one JSON object per image")
    status = sub.add_parser("status", help="one image's status as JSON")
    status.add_argument("image")
    return p


def _as_dict(info: ImageInfo) -> dict[str, object]:
    return {
        "id": info.id,
        "repo_tags": list(info.repo_tags),
        "repo_digests": list(info.repo_digests),
        "size": info.size,
        "pinned": info.pinned,
    }


def _pull(client: ImageClient, args: argparse.Namespace) -> int:
    # Like kubelet: ImageStatus first (which also opens the connection), then PullImage;
    # "seconds" is the PullImage call alone.
    client.status(args.image)
    started = time.monotonic()
    ref = client.pull(args.image, args.creds, timeout=args.timeout or DEFAULT_PULL_TIMEOUT)
    seconds = time.monotonic() - started
    if args.json:
        print(json.dumps({"image": args.image, "image_ref": ref, "seconds": round(seconds, 3)}))
    else:
        print(f"pulled {args.image}: {ref} in {seconds:.2f} s")
    return 0


def _ls(client: ImageClient, args: argparse.Namespace) -> int:
    images = sorted(client.list(), key=lambda i: (i.repo_tags, i.id))
    if args.json:
        for info in images:
            print(json.dumps(_as_dict(info)))
        return 0
    print(f"{'IMAGE':<60} {'ID':<19} {'SIZE':>12}")
    for info in images:
        for name in info.repo_tags or info.repo_digests or ("<none>",):
            print(f"{name:<60} {info.id.removeprefix('sha256:')[:19]:<19} {info.size:>12}")
    return 0


def _run(client: ImageClient, args: argparse.Namespace) -> int:
    if args.action == "pull":
        return _pull(client, args)
    if args.action == "rmi":
        for image in args.images:
            client.remove(image)
            print(f"removed {image}")
        return 0
    if args.action == "ls":
        return _ls(client, args)
    info = client.status(args.image)
    if info is None:
        print(f"{args.image}: not present", file=sys.stderr)
        return 1
    print(json.dumps(_as_dict(info), indent=2))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "apull cri") -> int:
    args = parser(prog).parse_args(argv)
    try:
        with ImageClient(args.address, args.timeout or DEFAULT_TIMEOUT) as client:
            return _run(client, args)
    except CriError as err:
        print(f"{prog} {args.action}: {err}", file=sys.stderr)
        return 1


def node_main(argv: Sequence[str] | None = None) -> int:
    """`apull-containerd-grpc cri ...` on a node."""
    return main(argv, prog="apull-containerd-grpc cri")


if __name__ == "__main__":
    sys.exit(main())
