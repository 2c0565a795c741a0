#!/usr/bin/python
# Copyright: apull-deploy contributors
# Apache License 2.0
"""Documentation of the image_convert action (plugins/action/image_convert.py does the work)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: image_convert
short_description: Convert an image in a registry to the apull format, unless already done
description:
  - Runs on the controller (an action plugin) C(apull-image-build convert --skip-if-current),
    showing its progress line by line (each layer - sizes, chunks, time per step).
  - Idempotent - when the target's manifest records the source's manifest as it is now, the
    same format, EROFS builder and chunk size, and the target has every layer blob and chunk
    table, nothing is converted and the result is C(ok).
  - In check mode only reads both registries and says whether it would convert and why;
    with C(--diff), the target's manifest before and what it would be made from.
  - Converting needs root on the controller (layers keep owners and device nodes).
options:
  source:
    description: Image to convert (C(host[:port]/repo:tag) or C(@digest)).
    type: str
    required: true
  target:
    description: Where to push the converted image (a tag).
    type: str
    required: true
  source_insecure:
    description: Source registry over plain HTTP or unverified TLS.
    type: bool
    default: false
  target_insecure:
    description: Target registry over plain HTTP or unverified TLS.
    type: bool
    default: false
  chunk_size:
    description: Bytes per verified chunk, a power of two from 4096; K/M/G suffixes.
    type: str
    default: 1M
  platform:
    description: Platform picked from an index.
    type: str
    default: linux/amd64
  auth_file:
    description: Docker-style credentials file; unset uses the converter's default search.
    type: path
  work_dir:
    description: Scratch space; unset uses C($TMPDIR).
    type: path
author: apull-deploy contributors
"""

EXAMPLES = r"""
- name: Convert busybox for lazy loading
  apull.deploy.image_convert:
    source: 127.0.0.1:5000/lab/busybox:latest
    target: 127.0.0.1:5000/lab/busybox:apull
    source_insecure: true
    target_insecure: true
"""

RETURN = r"""
status:
  description: C(converted), C(current) or (check mode) C(would convert).
  returned: success
  type: str
reason:
  description: Why the target was (or was not) current.
  returned: success
  type: str
source_manifest:
  description: Digest of the source's platform manifest.
  returned: success
  type: str
target_manifest:
  description: Digest of the target manifest (empty when it does not exist).
  returned: success
  type: str
layers:
  description: Number of layers.
  returned: success
  type: int
layers_uploaded:
  description: Layer blobs uploaded by this run.
  returned: success
  type: int
source_bytes:
  description: Compressed size of the source layers.
  returned: success
  type: int
target_bytes:
  description: Size of the EROFS layer blobs.
  returned: success
  type: int
seconds:
  description: Time the converter took.
  returned: success
  type: float
"""
