"""Our CRI image proto against the Kubernetes CRI's wire contract (runtime.v1): service and
method names, and each message's field numbers and types, as containerd's CRI plugin reads
them. A wrong number here would make containerd see a different field, silently."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from apull_node.cri.api import images_pb2 as pb

# The numbers and types of k8s.io/cri-api's pkg/apis/runtime/v1/api.proto for what we use.
CONTRACT = {
    "ImageSpec": {"image": (1, F.TYPE_STRING), "annotations": (2, F.TYPE_MESSAGE)},
    "AuthConfig": {
        "username": (1, F.TYPE_STRING),
        "password": (2, F.TYPE_STRING),
        "auth": (3, F.TYPE_STRING),
        "server_address": (4, F.TYPE_STRING),
        "identity_token": (5, F.TYPE_STRING),
        "registry_token": (6, F.TYPE_STRING),
    },
    "Int64Value": {"value": (1, F.TYPE_INT64)},
    "Image": {
        "id": (1, F.TYPE_STRING),
        "repo_tags": (2, F.TYPE_STRING),
        "repo_digests": (3, F.TYPE_STRING),
        "size": (4, F.TYPE_UINT64),
        "uid": (5, F.TYPE_MESSAGE),
        "username": (6, F.TYPE_STRING),
        "spec": (7, F.TYPE_MESSAGE),
        "pinned": (8, F.TYPE_BOOL),
    },
    "ImageFilter": {"image": (1, F.TYPE_MESSAGE)},
    "ListImagesRequest": {"filter": (1, F.TYPE_MESSAGE)},
    "ListImagesResponse": {"images": (1, F.TYPE_MESSAGE)},
    "ImageStatusRequest": {"image": (1, F.TYPE_MESSAGE), "verbose": (2, F.TYPE_BOOL)},
    "ImageStatusResponse": {"image": (1, F.TYPE_MESSAGE), "info": (2, F.TYPE_MESSAGE)},
    "PullImageRequest": {"image": (1, F.TYPE_MESSAGE), "auth": (2, F.TYPE_MESSAGE)},
    "PullImageResponse": {"image_ref": (1, F.TYPE_STRING)},
    "RemoveImageRequest": {"image": (1, F.TYPE_MESSAGE)},
    "RemoveImageResponse": {},
}


def test_the_package_and_service_are_the_cri_ones() -> None:
    assert pb.DESCRIPTOR.package == "runtime.v1"
    service = pb.DESCRIPTOR.services_by_name["ImageService"]
    assert service.full_name == "runtime.v1.ImageService"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "ListImages": ("ListImagesRequest", "ListImagesResponse"),
        "ImageStatus": ("ImageStatusRequest", "ImageStatusResponse"),
        "PullImage": ("PullImageRequest", "PullImageResponse"),
        "RemoveImage": ("RemoveImageRequest", "RemoveImageResponse"),
    }


@pytest.mark.parametrize("message", sorted(CONTRACT))
def test_field_numbers_and_types(message: str) -> None:
    fields = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
    assert {name: (f.number, f.type) for name, f in fields.items()} == CONTRACT[message]


def test_a_pull_request_encodes_as_the_cri_expects() -> None:
    request = pb.PullImageRequest(
        image=pb.ImageSpec(image="r/x:1"), auth=pb.AuthConfig(username="u", password="p")
    )
    # field 1 (ImageSpec, length 7: field 1 "r/x:1"), field 2 (AuthConfig: 1 "u", 2 "p")
    assert request.SerializeToString() == b"\x0a\x07\x0a\x05r/x:1\x12\x06\x0a\x01u\x12\x01p"
