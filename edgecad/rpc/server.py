"""`edgecad rpc-server`: llama.cpp's RPC server on this device's CPU, announcing the memory it lends."""
from __future__ import annotations

import ctypes
from typing import Optional

from .. import native
from ..devices import cpu_device
from ..errors import EdgecadError
from ..native import RPC_START_SERVER, ggml_base
from . import parse_endpoint, require, sockets


def announce(dev: int, free: int, total: int) -> None:
    """Make `dev` report `free` of `total` bytes (what a server announces), and check that it took."""
    native.check(native.lib.ec_device_announce_memory(dev, free, total), "ec_device_announce_memory")
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    ggml_base.ggml_backend_dev_memory(dev, ctypes.byref(f), ctypes.byref(t))
    if (f.value, t.value) != (free, total):
        raise EdgecadError("cannot set the memory this device announces (the ggml device layout differs from "
                           "the one edgecad was written for): reinstall with the pinned llama-cpp-python")


def serve(host: str, port: int, *, n_threads: int, cache_dir: Optional[str] = None) -> None:
    """Run llama.cpp's RPC server on this device's CPU (returns only when it fails to start). host: an IPv4
    address or a name that has one (parse_endpoint)."""
    require()
    host, port = parse_endpoint(f"{host}:{port}")
    sockets()  # (keepalive on the engines' connections: one whose machine left no longer holds this server)
    start = native.rpc_function("ggml_backend_rpc_start_server", RPC_START_SERVER)
    devs = (ctypes.c_void_p * 1)(cpu_device())
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devs)
