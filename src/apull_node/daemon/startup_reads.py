"""What images read when they start, as apulld sees it: the start-up sets prewarm uses.

Each blob's reads (the kernel's READs on fscache, FUSE reads on the file backend) are kept
for the first WINDOW_SECONDS after the first read of it this apulld serves: a container's
start reads its layers on demand, and those ranges are what the next node should have
before its first start. The window opens at the first read, which on a pull through the
snapshotter is the mount's (the superblock): record an image by pulling and starting it
together, as kubelet does, on a node where it is cold. On fscache the kernel asks nothing
for what its cache file holds, so a warm image records nothing there; the file backend sees
every read EROFS does not find in its page cache. Prewarm's own fetches are never reads.
Kept in memory only (an apulld restart starts afresh), bounded (MAX_BLOBS blobs,
MAX_RANGES ranges each, merged); `GET /v1.0/apulld/startup` hands them out, per image, and
the prewarm command (`--show-startup IMAGE...`) prints them for the prewarm role to pass on.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

#: Reads of a blob kept after its first read.
WINDOW_SECONDS = 60.0
#: Blobs remembered (the least recently first-read ones go).
MAX_BLOBS = 1024
#: Ranges kept per blob (neighbours merged first).
MAX_RANGES = 4096


@dataclass
class _Blob:
    first: float
    ranges: list[tuple[int, int]] = field(default_factory=list)


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if out and offset <= out[-1][0] + out[-1][1]:
            start, size = out[-1]
            out[-1] = (start, max(size, offset + length - start))
        else:
            out.append((offset, length))
    return out


class StartupReads:
    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._blobs: OrderedDict[str, _Blob] = OrderedDict()

    def saw(self, digest: str, offset: int, length: int) -> None:
        """A read of [offset, offset + length) of the blob."""
        if length <= 0:
            return
        now = time.monotonic()
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is None:
                blob = self._blobs[digest] = _Blob(now)
                while len(self._blobs) > MAX_BLOBS:
                    self._blobs.popitem(last=False)
            if now - blob.first > self.window:
                return
            blob.ranges.append((offset, length))
            if len(blob.ranges) > MAX_RANGES:
                blob.ranges = merged(blob.ranges)[:MAX_RANGES]

    def sets(self) -> dict[str, list[list[int]]]:
        """{blob digest: [[offset, length], ...]} of every blob read so far."""
        with self._lock:
            blobs = {digest: list(blob.ranges) for digest, blob in self._blobs.items()}
        return {d: [[o, n] for o, n in merged(r)] for d, r in blobs.items() if r}
