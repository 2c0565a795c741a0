"""A small client of containerd's CRI image service (runtime.v1.ImageService) over its socket.

Pulls go through the CRI plugin exactly as kubelet's do: containerd resolves the image with
CRI's registry settings (config.toml's `registry.mirrors`), then pulls with unpack into CRI's
snapshotter, passing the layer annotations that let a remote snapshotter (apull) skip the
download. `ctr images pull` cannot do that on containerd 1.6: it fetches every layer first.

    ref = pull_image("/run/containerd/containerd.sock", "registry.lab:5000/lab/busybox:latest")

Images land in containerd's `k8s.io` namespace (`ctr -n k8s.io images ls`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from apull_node.cri.api import images_pb2 as pb
from apull_node.cri.api import images_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
#: Seconds a pull may take (a whole image over a slow link); other calls take far less.
DEFAULT_PULL_TIMEOUT = 600.0
DEFAULT_TIMEOUT = 30.0
#: A node with many images answers ListImages with more than gRPC's default 4 MiB.
MAX_MESSAGE = 64 << 20


class CriError(Exception):
    """A CRI call failed; `code` is the gRPC status name (e.g. "NOT_FOUND", "UNAVAILABLE")."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Auth:
    """Registry credentials for one pull (CRI's AuthConfig): user and password, or a token."""

    username: str = ""
    password: str = ""
    auth: str = ""  #: base64 of "user:password", as in a docker config.json
    server_address: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def message(self) -> Any:
        return pb.AuthConfig(
            username=self.username,
            password=self.password,
            auth=self.auth,
            server_address=self.server_address,
            identity_token=self.identity_token,
            registry_token=self.registry_token,
        )


@dataclass(frozen=True)
class ImageInfo:
    """What CRI reports about one image."""

    id: str  #: the image config's digest, "sha256:..."
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int  #: bytes, as CRI counts them (the compressed layers)
    pinned: bool

    @classmethod
    def of(cls, image: Any) -> ImageInfo:
        return cls(
            id=str(image.id),
            repo_tags=tuple(image.repo_tags),
            repo_digests=tuple(image.repo_digests),
            size=int(image.size),
            pinned=bool(image.pinned),
        )


def channel_target(address: str) -> str:
    """gRPC's name for a containerd socket: a path, `unix:PATH` or `unix://PATH`."""
    if address.startswith("unix://"):
        return "unix:" + address[len("unix://") :]
    if address.startswith("unix:"):
        return address
    return "unix:" + address


def _error(err: grpc.RpcError, call: str, address: str) -> CriError:
    code = err.code()
    name = code.name if code is not None else "UNKNOWN"
    details = err.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        text = f"cannot reach containerd on {address}: {details}"
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        text = (
            f"containerd on {address} does not serve runtime.v1.ImageService (is its CRI "
            f"plugin disabled in config.toml?): {details}"
        )
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        text = f"{call} did not finish in time: {details}"
    else:
        text = f"{call}: {name}: {details}"
    return CriError(text, name)


class ImageClient:
    """One connection to containerd's CRI image service; close() it (or use `with`)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            channel_target(address),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)],
        )
        stub: Any = pb_grpc.ImageServiceStub  # generated code, untyped
        self._stub = stub(self._channel)

    def _call(self, name: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self._stub, name)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise _error(err, name, self.address) from err

    def pull(
        self,
        image: str,
        auth: Auth | None = None,
        annotations: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_PULL_TIMEOUT,
    ) -> str:
        """Pull (and unpack) `image`; the image reference CRI returns (its id, "sha256:...")."""
        request = pb.PullImageRequest(
            image=pb.ImageSpec(image=image, annotations=dict(annotations or {}))
        )
        if auth is not None:
            request.auth.CopyFrom(auth.message())
        return str(self._call("PullImage", request, timeout).image_ref)

    def status(self, image: str) -> ImageInfo | None:
        """The image as CRI knows it, or None when it is not there."""
        request = pb.ImageStatusRequest(image=pb.ImageSpec(image=image))
        response = self._call("ImageStatus", request, None)
        return ImageInfo.of(response.image) if response.HasField("image") else None

    def remove(self, image: str) -> None:
        """Remove `image` (a name or id); removing an absent image is not an error."""
        self._call("RemoveImage", pb.RemoveImageRequest(image=pb.ImageSpec(image=image)), None)

    def list(self, image: str = "") -> list[ImageInfo]:
        """Every image, or those matching `image` (a name or id)."""
        request = pb.ListImagesRequest()
        if image:
            request.filter.image.image = image
        return [ImageInfo.of(i) for i in self._call("ListImages", request, None).images]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ImageClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def pull_image(
    address: str,
    image: str,
    auth: Auth | None = None,
    timeout: float = DEFAULT_PULL_TIMEOUT,
) -> str:
    """Pull `image` through CRI on containerd at `address`; the image reference."""
    with ImageClient(address) as client:
        return client.pull(image, auth, timeout=timeout)


def image_status(address: str, image: str, timeout: float = DEFAULT_TIMEOUT) -> ImageInfo | None:
    with ImageClient(address, timeout) as client:
        return client.status(image)


def remove_image(address: str, image: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    with ImageClient(address, timeout) as client:
        client.remove(image)


def list_images(address: str, timeout: float = DEFAULT_TIMEOUT) -> list[ImageInfo]:
    with ImageClient(address, timeout) as client:
        return client.list()
