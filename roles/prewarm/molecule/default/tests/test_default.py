"""The prewarm role left both images on the node: the converted one whole in apulld's cache
(read live from the cache, not from the role's report), the plain one pulled."""

import json

import pytest

testinfra_hosts = ["ansible://molecule_nodes"]


def _check(host, tag):
    registry = host.ansible.get_variables()["apull_registry"]
    out = host.check_output(
        f"/usr/bin/apull-containerd-grpc prewarm --check {registry}/lab/busybox:{tag}"
    )
    return json.loads(out.splitlines()[-1])


def test_the_converted_image_is_whole_in_the_cache(host):
    state = _check(host, "prewarm")
    assert (state["state"], state["last"], state["lazy"]) == ("present", "warm", True)
    assert state["bytes"] > 0
    assert state["cached"] == state["bytes"]


def test_the_plain_image_is_pulled_and_needs_no_warming(host):
    state = _check(host, "latest")
    assert (state["state"], state["lazy"]) == ("present", False)


@pytest.mark.parametrize("tag", ["prewarm", "latest"])
def test_cri_lists_the_image(host, tag):
    registry = host.ansible.get_variables()["apull_registry"]
    out = host.check_output("/usr/bin/apull-containerd-grpc cri ls --json")
    names = [n for line in out.splitlines() for n in json.loads(line)["repo_tags"]]
    assert f"{registry}/lab/busybox:{tag}" in names
