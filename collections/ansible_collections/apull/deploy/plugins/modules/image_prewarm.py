#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Prewarm images on a node: pull through CRI, warm the lazily fetched layers."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: image_prewarm
short_description: Pull images through CRI and warm their lazily fetched layers on a node
description:
  - Runs C(apull-containerd-grpc prewarm) on the node for every image, one after the other
    - an image that is absent is pulled through CRI (through the apull snapshotter, as kubelet
      pulls);
    - a converted image is warmed by apulld, its start-up set first (I(startup_file)), then
      whole unless I(startup_only);
    - an image that is not converted needs the pull alone.
  - A rerun does only what is missing, and reports no change when nothing was pulled or
    fetched.
  - In check mode it changes nothing and reports which images are absent (would be pulled)
    and where each present image's last prewarm on this node stands.
  - Fails when an image is not warm, naming each such image and the reason; the results of
    the others are returned all the same.
options:
  images:
    description: Image references (registry/repository:tag or @digest).
    type: list
    elements: str
    required: true
  binary:
    description: The snapshotter's binary, which carries the prewarm command.
    type: path
    default: /usr/bin/apull-containerd-grpc
  config:
    description: The stack's settings file (apulld's and containerd's sockets).
    type: path
    default: /etc/apull/config.toml
  startup_file:
    description:
      - 'Start-up sets on the node: JSON, C({"layers": {DIGEST: [[OFFSET, LENGTH], ...]}}).'
      - Empty warms the whole image only.
    type: path
    default: ""
  startup_only:
    description: Warm the start-up set only, not the rest.
    type: bool
    default: false
  wait:
    description: Seconds to wait for each image's prewarm.
    type: float
    default: 1800
  retries:
    description: Prewarms again after a failure, per image (each fetches only what is missing).
    type: int
    default: 2
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Prewarm the images
  apull.deploy.image_prewarm:
    images:
      - registry.example.com/cuda-minimal:apull
  register: prewarm
"""

RETURN = r"""
images:
  description:
    - One entry per image - image, manifest, pulled, state (warm, failed, warming when I(wait)
      ran out; absent or present in check mode), error, lazy, bytes, cached, startup_bytes,
      startup_cached, fetched (bytes this run fetched), seconds.
  returned: always
  type: list
  elements: dict
summary:
  description: One line per image, for the report.
  returned: always
  type: list
  elements: str
"""

import contextlib
import json

from ansible.module_utils.basic import AnsibleModule


def _line(entry):
    image = entry.get("image", "?")
    state = entry.get("state", "?")
    if state in ("failed", "warming"):
        return "%s: %s: %s" % (image, state, entry.get("error") or "no reason given")
    if state == "absent":
        return "%s: absent (would pull and warm)" % image
    if entry.get("lazy") is False:
        return "%s: %s (not converted: the pull is all)" % (
            image,
            "pulled" if entry.get("pulled") else "present",
        )
    total = entry.get("bytes") or 0
    cached = entry.get("cached") or 0
    share = "%d%%" % (100 * cached // total) if total else "-"
    if state == "present":
        last = entry.get("last") or "never prewarmed here"
        return "%s: present, %s cached (last prewarm: %s)" % (image, share, last)
    text = "%s: warm, %s of %d bytes cached" % (image, share, total)
    if entry.get("startup_bytes"):
        text += ", start-up set %d%%" % (
            100 * (entry.get("startup_cached") or 0) // entry["startup_bytes"]
        )
    text += ", %d bytes fetched, %s%.1f s" % (
        entry.get("fetched") or 0,
        "pulled, " if entry.get("pulled") else "",
        entry.get("seconds") or 0,
    )
    return text


def _would_change(entry, startup_only):
    """In check mode: whether a run would pull or fetch. What the cache holds is read live
    by apulld (an image warmed once and evicted since counts); the start-up set of an image
    never prewarmed here is not known, so a cache short of the whole image counts."""
    if entry.get("state") == "absent":
        return True
    if entry.get("lazy") is False:
        return False
    if entry.get("error"):
        return True
    if startup_only and entry.get("last") == "warm":
        return entry.get("startup_cached") != entry.get("startup_bytes")
    return entry.get("cached") != entry.get("bytes")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            images=dict(type="list", elements="str", required=True),
            binary=dict(type="path", default="/usr/bin/apull-containerd-grpc"),
            config=dict(type="path", default="/etc/apull/config.toml"),
            startup_file=dict(type="path", default=""),
            startup_only=dict(type="bool", default=False),
            wait=dict(type="float", default=1800),
            retries=dict(type="int", default=2),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not p["images"]:
        module.exit_json(changed=False, images=[], summary=[])
    argv = [
        p["binary"],
        "prewarm",
        "--config",
        p["config"],
        "--wait",
        str(p["wait"]),
        "--retries",
        str(p["retries"]),
    ]
    if p["startup_file"]:
        argv += ["--startup", p["startup_file"]]
    if p["startup_only"]:
        argv.append("--startup-only")
    if module.check_mode:
        argv.append("--check")
    rc, out, err = module.run_command(argv + ["--"] + p["images"])
    images = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                images.append(json.loads(line))
    if rc == 2 or len(images) != len(p["images"]):
        module.fail_json(
            msg="prewarm did not run: %s" % (err.strip() or out.strip()),
            rc=rc,
            images=images,
            summary=[],
        )
    summary = [_line(entry) for entry in images]
    changed = any(e.get("pulled") or e.get("fetched") for e in images)
    if module.check_mode:
        changed = any(_would_change(e, p["startup_only"]) for e in images)
    failed = [e for e in images if e.get("state") not in ("warm", "absent", "present")]
    if failed:
        module.fail_json(
            msg="not warm: " + "; ".join(_line(e) for e in failed),
            changed=changed,
            images=images,
            summary=summary,
        )
    module.exit_json(changed=changed, images=images, summary=summary)


if __name__ == "__main__":
    main()
