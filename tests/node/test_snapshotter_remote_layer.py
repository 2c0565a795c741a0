"""What the snapshotter reads from an apull layer's Prepare labels: the blob, its registry and
repository (from CRI's image-ref), and the errors that name the label at fault."""

from __future__ import annotations

import pytest

from apull_node.image import format as fmt
from apull_node.snapshotter.errors import FailedPreconditionError, InvalidArgumentError
from apull_node.snapshotter.remote_layer import (
    CRI_IMAGE_REF_LABEL,
    blob_id_of,
    is_apull_layer,
    remote_layer,
)

DIGEST = "sha256:" + "ab" * 32
TABLE = "sha256:" + "cd" * 32
SOCKET = "/run/apulld.sock"


def labels(**changes: str) -> dict[str, str]:
    base = {
        "containerd.io/snapshot.ref": "sha256:" + "01" * 32,
        fmt.LAYER_FORMAT_VERSION: fmt.FORMAT_VERSION,
        fmt.LAYER_BLOB_DIGEST: DIGEST,
        fmt.LAYER_BLOB_SIZE: "123456",
        fmt.LAYER_CHUNK_TABLE: TABLE,
        fmt.LAYER_CHUNK_TABLE_SIZE: "96",
        fmt.LAYER_CHUNK_SIZE: "1048576",
        fmt.LAYER_BLOCK_SIZE: "4096",
        CRI_IMAGE_REF_LABEL: "registry.lab:5000/lab/big:apull",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v != "-"}


def test_the_blob_config_comes_from_the_labels():
    layer = remote_layer(labels(), SOCKET)
    assert layer.blob_config() == {
        "blob_id": "sha256-" + "ab" * 32, "fsid": "sha256-" + "ab" * 32,
        "registry": "registry.lab:5000", "repo": "lab/big", "digest": DIGEST, "size": 123456,
        "chunk_table": TABLE, "chunk_table_size": 96, "chunk_size": 1048576,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("image", "registry", "repo"),
    [
        ("registry.lab:5000/lab/big@sha256:" + "ef" * 32, "registry.lab:5000", "lab/big"),
        ("registry.lab:5000/lab/big:apull@sha256:" + "ef" * 32, "registry.lab:5000", "lab/big"),
        ("localhost/x/y:1", "localhost", "x/y"),
        ("[::1]:5000/deep/er/repo:t", "[::1]:5000", "deep/er/repo"),
        # Docker Hub: CRI's normalised name, and the short forms; apulld gets the API host.
        ("docker.io/library/busybox:1.36", "registry-1.docker.io", "library/busybox"),
        ("busybox", "registry-1.docker.io", "library/busybox"),
        ("docker.io/someone/tool:apull", "registry-1.docker.io", "someone/tool"),
        ("index.docker.io/library/alpine", "registry-1.docker.io", "library/alpine"),
    ],
)
def test_registry_and_repository_from_the_image_ref(image: str, registry: str, repo: str):
    layer = remote_layer(labels(**{CRI_IMAGE_REF_LABEL: image}), SOCKET)
    assert (layer.registry, layer.repo) == (registry, repo)


def test_without_the_image_ref_the_message_says_what_to_do():
    with pytest.raises(FailedPreconditionError) as caught:
        remote_layer(labels(**{CRI_IMAGE_REF_LABEL: "-"}), SOCKET)
    message = str(caught.value)
    for part in (DIGEST, CRI_IMAGE_REF_LABEL, SOCKET, "crictl pull",
                 "disable_snapshot_annotations = false"):  # fmt: skip
        assert part in message


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        (fmt.LAYER_BLOB_SIZE, "-", f"label {fmt.LAYER_BLOB_SIZE} is missing"),
        (fmt.LAYER_BLOB_SIZE, "12kb", "is not a positive number"),
        (fmt.LAYER_BLOB_DIGEST, "sha256:xyz", "is not a digest"),
        (fmt.LAYER_CHUNK_TABLE, "-", f"label {fmt.LAYER_CHUNK_TABLE} is missing"),
        (fmt.LAYER_CHUNK_SIZE, "65537", "power of two"),
        (fmt.LAYER_FORMAT_VERSION, "1", f"this snapshotter reads version {fmt.FORMAT_VERSION}"),
        (CRI_IMAGE_REF_LABEL, "Registry.lab:5000/UPPER:x", "bad repository"),
    ],
)
def test_bad_labels_are_named(key: str, value: str, says: str):
    with pytest.raises(InvalidArgumentError, match=says):
        remote_layer(labels(**{key: value}), SOCKET)


def test_only_layers_with_the_format_label_are_apull_layers():
    assert is_apull_layer(labels())
    assert not is_apull_layer(labels(**{fmt.LAYER_FORMAT_VERSION: "-"}))


def test_blob_ids_have_no_colon():
    assert blob_id_of("sha512:" + "0" * 128) == "sha512-" + "0" * 128
    with pytest.raises(ValueError):
        blob_id_of("md5:abc")
