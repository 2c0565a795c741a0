"""A pull-through cache for tests: Debian's docker-registry (distribution 2.8) in proxy mode
in front of one origin registry. A real registry, not a stand-in.

What it does, as the tests rely on it:
- it asks the origin for `/v2/` as it starts, and exits when the origin does not answer, so
  it is started after the origin;
- a blob it does not hold yet is sent whole (HTTP 200, a Range header ignored) while it is
  stored in the background; once stored, ranges are served (HTTP 206);
- every request is one `response completed` line in its log (`requests()` reads them).

    with PullThroughCache(workdir, "127.0.0.1:5000") as cache:
        cache.address         # HOST:PORT
        cache.requests()      # the URIs asked so far, in order
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from apull.registry.client import RegistryClient


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PullThroughCache:
    def __init__(self, workdir: Path, origin: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.workdir = workdir
        self.origin = origin
        self.address = f"{host}:{port or _free_port(host)}"
        self.log = workdir / "pull-through.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "pull-through.yml"
        config.write_text(
            "version: 0.1\nlog: {level: info}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.workdir / 'data'}}}}}\n"
            f"http: {{addr: {self.address}}}\nproxy: {{remoteurl: http://{self.origin}}}\n"
        )
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                ["docker-registry", "serve", str(config)], stdout=out, stderr=out
            )
        deadline = time.monotonic() + timeout
        while not RegistryClient(self.address, timeout=2).ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the pull-through cache did not start:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def requests(self) -> list[str]:
        """The request URIs its log names so far, in order."""
        if not self.log.exists():
            return []
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if "response completed" in line and 'http.request.uri="' in line:
                found.append(line.split('http.request.uri="', 1)[1].split('"', 1)[0])
        return found

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
