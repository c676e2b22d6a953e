"""RPC servers in processes of their own on loopback: the bench's second device and the tests' servers."""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

from .. import cgroup


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`edgecad rpc-server` in a process of its own on loopback (the bench's second device, the tests' server), in
    a memory cgroup of `budget` bytes when one is given and a cgroup can be made; listening once constructed."""

    def __init__(self, budget: Optional[int] = None, *, cache: Optional[str] = None, threads: Optional[int] = None):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.cg = cgroup.MemoryCgroup(budget, "rpc") if budget and cgroup.available()[0] else None
        cmd = [sys.executable, "-m", "edgecad.cli", "rpc-server", "--port", str(self.port), "--memory-budget",
               f"{budget}B" if budget else "auto", *(["--cache", cache] if cache else []),  # (bytes, with a unit)
               *(["--threads", str(threads)] if threads else [])]
        # (cwd elsewhere: from a source checkout, `-m edgecad.cli` would import the unbuilt sources)
        self.p = (self.cg.start if self.cg else subprocess.Popen)(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tempfile.gettempdir())
        self.p.stdout.readline()  # its ready line; it listens right after
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(30)

    def close(self) -> None:
        self.kill()
        if self.cg:
            self.cg.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
