"""`apull-containerd-grpc prewarm IMAGE...`: images ready on this node before anyone needs
them (the prewarm role runs it on each node).

For each image, one after the other:
1. CRI ImageStatus, and PullImage when the image is absent (as kubelet pulls: through the
   apull snapshotter, which mounts a converted image's layers);
2. apulld's prewarm of the pulled image (PUT /v1.0/apulld/warm with the image's repo
   digest): its start-up set first (``--startup FILE``: {"layers": {layer digest:
   [[offset, length], ...]}}), then, unless ``--startup-only``, every other chunk;
3. its progress (GET) until it ends or ``--wait`` runs out, a line on stderr every few
   seconds; a failed prewarm is asked again (``--retries``) - it fetches only what is
   missing.

An image that is not converted needs the pull alone. ``--show-startup`` prints what images
read when they started on this node (apulld's start-up sets, in the --startup format), for
the prewarm role to hand to the other nodes. The result is one JSON object per
image on stdout: image, manifest, pulled (true when this run pulled it), state (warm,
failed, warming when --wait ran out), error, lazy, bytes, cached, startup_bytes,
startup_cached, fetched (bytes this run fetched), seconds. Exit status: 0 when every image
is warm, 1 when one is not, 2 for bad usage. With ``--check`` nothing changes: state is
absent, or present with "last" the state of its last prewarm here (empty: none), and exit
status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apull_node.cri.client import DEFAULT_PULL_TIMEOUT, CriError, ImageClient
from apull_node.image.oci import MANIFEST_ACCEPT
from apull_node.image.reference import ImageRefError, parse_reference
from apull_node.image.registry_auth import AuthError, Credentials, find_credentials
from apull_node.image.registry_connections import is_loopback
from apull_node.image.registry_session import RegistryError, RegistrySession
from apull_node.service.settings import (
    DEFAULT_CONFIG_PATH,
    ApulldSettings,
    SettingsError,
    load_settings,
)
from apull_node.snapshotter.apulld_client import ApulldClient, ApulldError

#: Seconds between progress reads (and lines on stderr).
POLL_SECONDS = 0.5
PROGRESS_EVERY = 5.0


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="apull-containerd-grpc prewarm",
        description="pull images through CRI and warm their lazily fetched layers",
    )
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="settings file")
    p.add_argument("--startup", type=Path, help="start-up sets: {layers: {digest: [[o, n]]}}")
    p.add_argument("--startup-only", action="store_true", help="warm the start-up set only")
    p.add_argument("--wait", type=float, default=1800.0, help="seconds per image (1800)")
    p.add_argument("--retries", type=int, default=2, help="prewarms again after a failure (2)")
    p.add_argument("--pull-timeout", type=float, default=DEFAULT_PULL_TIMEOUT)
    p.add_argument(
        "--show-startup",
        action="store_true",
        help="print what the IMAGEs (all images, without any) read when they started on "
        "this node (apulld's start-up sets, the --startup file's format) and exit",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="change nothing: say whether each image is present and where its last "
        "prewarm stands (state absent, present or the prewarm's)",
    )
    return p.parse_args(argv)


def startup_sets(path: Path | None) -> dict[str, list[list[int]]]:
    """{layer digest: [[offset, length], ...]} from the file (none without one)."""
    if path is None:
        return {}
    document = json.loads(path.read_text())
    layers = document.get("layers") if isinstance(document, dict) else None
    if not isinstance(layers, dict):
        raise ValueError(f'{path}: expected {{"layers": {{digest: [[offset, length]]}}}}')
    return layers


def _credentials(host: str, auth: Path | None) -> Credentials | None:
    return find_credentials(host, auth) if auth is not None and auth.is_file() else None


def repo_digests(found: Sequence[str], registry: str, repository: str) -> list[str]:
    """The digests CRI recorded for the image's repository (registry/repo@sha256:...), in
    its order; LookupError when there is none."""
    names = {f"{registry}/{repository}"}
    if registry == "docker.io":
        names |= {f"docker.io/{repository}", repository, repository.removeprefix("library/")}
    digests = []
    for entry in found:
        name, _, digest = entry.rpartition("@")
        if name in names and digest and digest not in digests:
            digests.append(digest)
    if not digests:
        raise LookupError(f"CRI has no repo digest for {registry}/{repository}: {list(found)}")
    return digests


class Prewarm:
    def __init__(
        self,
        cri: ImageClient,
        apulld: ApulldClient,
        args: argparse.Namespace,
        startup: dict[str, list[list[int]]],
        apulld_settings: ApulldSettings | None = None,
    ) -> None:
        self.cri = cri
        self.apulld = apulld
        self.args = args
        self.startup = startup
        self.apulld_settings = apulld_settings or ApulldSettings()

    def located(self, image: str, pull: bool) -> tuple[Any, str, bool]:
        """(reference, repo digest or "" when absent, pulled now)."""
        ref = parse_reference(image)
        info = self.cri.status(image)
        pulled = False
        if info is None and pull:
            self.cri.pull(image, timeout=self.args.pull_timeout)
            pulled = True
            info = self.cri.status(image)
            if info is None:
                raise CriError("pulled, but CRI does not know the image")
        if info is None:
            return ref, "", False
        if ref.reference.startswith("sha256:"):
            return ref, ref.reference, pulled
        return ref, self._converted(ref, info.repo_digests), pulled

    def _converted(self, ref: Any, found: Sequence[str]) -> str:
        """The repo digest to warm. CRI names an image by its config, which a converted
        image shares with its original: with both pulled, CRI gives the digests of both for
        either tag. The tag's digest in the registry settles it when it is one of them;
        else the one whose manifest has apull layers (apulld reads each manifest; nothing
        is fetched), else the first."""
        digests = repo_digests(found, ref.registry, ref.repository)
        if len(digests) > 1 and (tagged := self._tag_digest(ref)) in digests:
            return tagged
        if len(digests) > 1:
            for digest in digests:
                try:
                    seen = self.apulld.warm_progress(digest, ref.endpoint, ref.repository)
                except ApulldError:
                    break
                if seen.get("lazy") and not seen.get("error"):
                    return digest
        return digests[0]

    def _tag_digest(self, ref: Any) -> str:
        """The digest the registry gives the tag now (HEAD, with apulld's insecure hosts and
        credentials); "" when it cannot be had."""
        settings = self.apulld_settings
        auth = Path(settings.registry_auth_file) if settings.registry_auth_file else None
        host = ref.endpoint
        session = RegistrySession(
            host,
            ref.repository,
            insecure=host in settings.registry_insecure or is_loopback(host),
            find_credentials=lambda: (
                find_credentials(host, auth) if auth and auth.is_file() else None
            ),
            timeout=30.0,
        )
        try:
            url = session.repo_url(f"manifests/{ref.reference}")
            with session.request("HEAD", url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
                digest = resp.headers.get("docker-content-digest", "")
                return digest if resp.status == 200 else ""
        except (RegistryError, AuthError):
            return ""

    def image(self, image: str) -> dict[str, Any]:
        started = time.monotonic()
        result: dict[str, Any] = {"image": image, "pulled": False, "state": "failed"}
        try:
            ref, manifest, result["pulled"] = self.located(image, not self.args.check)
        except (CriError, ImageRefError, LookupError) as err:
            result["error"] = f"pull: {err}"
            return self._done(result, started)
        if not manifest:
            result["state"] = "absent"
            return self._done(result, started)
        result["manifest"] = manifest
        if self.args.check:
            try:
                last = self.apulld.warm_progress(manifest, ref.endpoint, ref.repository)
            except ApulldError as err:
                last = {"error": f"apulld: {err}"}
            result.update({k: last.get(k) for k in (
                "error", "lazy", "bytes", "cached", "startup_bytes", "startup_cached"
            ) if k in last})  # fmt: skip
            result["state"] = "present"
            result["last"] = last.get("state", "")
            return self._done(result, started)
        body = {
            "registry": ref.endpoint,
            "repo": ref.repository,
            "manifest": manifest,
            "whole": not self.args.startup_only,
            "startup": self.startup,
        }
        fetched = 0
        for attempt in range(max(0, self.args.retries) + 1):
            try:
                progress = self._warm(body, image)
            except ApulldError as err:
                result["error"] = f"apulld: {err}"
                break
            fetched += int(progress.get("fetched", 0))
            result.update({k: progress.get(k) for k in (
                "state", "error", "lazy", "bytes", "cached", "startup_bytes", "startup_cached"
            )})  # fmt: skip
            if progress.get("state") != "failed" or attempt == self.args.retries:
                break
            print(f"{image}: prewarm failed ({progress.get('error')}); trying again",
                  file=sys.stderr)  # fmt: skip
            time.sleep(min(30.0, 2.0 * 2**attempt))
        result["fetched"] = fetched
        return self._done(result, started)

    def _warm(self, body: dict[str, Any], image: str) -> dict[str, Any]:
        answer = self.apulld.warm(body)
        deadline = time.monotonic() + self.args.wait
        if not answer.get("started"):
            # A prewarm of the image was running already (perhaps asked otherwise): wait for
            # it, then ask for ours; it fetches only what is still missing.
            self._follow(body, image, deadline)
            self.apulld.warm(body)
        return self._follow(body, image, deadline)

    def _follow(self, body: dict[str, Any], image: str, deadline: float) -> dict[str, Any]:
        shown = time.monotonic()
        while True:
            progress = self.apulld.warm_progress(body["manifest"])
            if progress.get("state") != "warming" or time.monotonic() > deadline:
                return progress
            if time.monotonic() - shown >= PROGRESS_EVERY:
                shown = time.monotonic()
                total = int(progress.get("bytes") or 0)
                cached = int(progress.get("cached") or 0)
                share = f"{100 * cached / total:.0f}%" if total else "-"
                print(f"{image}: {share} of {total} bytes cached", file=sys.stderr)
            time.sleep(POLL_SECONDS)

    @staticmethod
    def _done(result: dict[str, Any], started: float) -> dict[str, Any]:
        result["seconds"] = round(time.monotonic() - started, 3)
        result.setdefault("error", "")
        print(json.dumps(result, sort_keys=True), flush=True)
        return result


def show_startup(
    containerd: str, apulld: ApulldClient, args: argparse.Namespace, settings: ApulldSettings
) -> int:
    """Print the start-up sets this node recorded: of the images' layers when images are
    named (those absent here have none), else of every blob."""
    layers: dict[str, Any] = {}
    try:
        if not args.images:
            layers = apulld.startup_sets().get("layers", {})
        with ImageClient(containerd) as cri:
            run = Prewarm(cri, apulld, args, {}, settings)
            for image in args.images:
                ref, manifest, _ = run.located(image, pull=False)
                if manifest:
                    found = apulld.startup_sets(ref.endpoint, ref.repository, manifest)
                    layers.update(found.get("layers", {}))
    except (ApulldError, CriError, ImageRefError, LookupError) as err:
        print(f"apull-containerd-grpc prewarm: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"layers": layers}, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        loaded = load_settings(args.config)
        settings = loaded.snapshotter
        startup = {} if args.check else startup_sets(args.startup)
    except (OSError, ValueError, SettingsError) as err:
        print(f"apull-containerd-grpc prewarm: {err}", file=sys.stderr)
        return 2
    apulld = ApulldClient(settings.apulld_address)
    if args.show_startup:
        return show_startup(settings.containerd_address, apulld, args, loaded.apulld)
    if not args.images:
        print("apull-containerd-grpc prewarm: no IMAGE given", file=sys.stderr)
        return 2
    results = []
    with ImageClient(settings.containerd_address) as cri:
        run = Prewarm(cri, apulld, args, startup, loaded.apulld)
        for image in args.images:
            results.append(run.image(image))
    if args.check:
        return 0
    return 0 if all(r["state"] == "warm" for r in results) else 1
