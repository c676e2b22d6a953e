"""Other devices' memory through llama.cpp's RPC backend (ggml-rpc): `edgecad rpc-server` on one device,
`Engine(remote=["host:port"])` on the other.

A server exposes its CPU to the network. The engine registers each server as a ggml device and llama.cpp puts
whole target layers there (the last ones), sends their weights at load (the server's cache, `--cache`, spares
resending them on the next load) and runs them there in each pass: only activations cross the network. The
memory plan (edgecad.plan.remote) gives each server as many layers as its announced memory holds; the
target's other layers are resident or paged locally as without servers, and the draft stays local.

ggml's RPC client aborts the process when a server goes away. native/remote.c traps that abort and parks the
thread that met it; every llama.cpp call that may reach a server runs in a watched thread (`watched`) that is
given up when the trap fires, and `RemoteLostError` says which server went and what to do. ggml's client has no
timeouts: native/remote.c gives its sockets TCP keepalive and a timeout (`timeout()`, EDGECAD_RPC_TIMEOUT), so a
server that stops answering is lost after a bounded wait, and a Ctrl-C gives up on a watched call at once (GRACE).
The protocol has no authentication and no encryption: a server binds 127.0.0.1 unless told otherwise.

The backend is compiled only with -DGGML_RPC=on (scripts/build_rpc.sh; not in the default pip build).
"""
from __future__ import annotations

import os
import socket
import sys

from .. import native
from ..errors import EdgecadError
from ..llama import init_backend

DEFAULT_PORT = 50052  # llama.cpp's rpc-server's
BUILD_HINT = "install llama-cpp-python with llama.cpp's RPC backend: bash scripts/build_rpc.sh (docs/devices.md)"


def address(name: str):
    """The address of a function of the RPC backend, or None without one (llama.cpp's log captured first: its RPC
    errors become one line)."""
    init_backend()
    return native.rpc_address(name)


def available() -> bool:
    """This llama.cpp has the RPC backend."""
    return address("ggml_backend_rpc_add_server") is not None


def require() -> None:
    if not available():
        raise EdgecadError(f"this llama.cpp has no RPC backend (remote devices, rpc-server): {BUILD_HINT}")


# ---------------------------------------------------------------------------- endpoints

def parse_endpoint(s: str) -> tuple[str, int]:
    """(IPv4 address, port) of "host:port" or "host" (port 50052): ggml's RPC client and server speak IPv4 only
    and take no names. An EdgecadError naming the fix otherwise."""
    host, sep, port = str(s).strip().rpartition(":")
    if not sep:
        host, port = port, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in " []:"):
        raise EdgecadError(f"remote device {s!r} is not host:port with an IPv4 address or a name: give e.g. "
                           f"192.168.1.20:{DEFAULT_PORT} (llama.cpp's RPC backend has no IPv6)")
    try:
        return socket.gethostbyname(host), int(port)
    except OSError:
        raise EdgecadError(f"remote device {s!r}: {host} has no IPv4 address (llama.cpp's RPC backend has no "
                           "IPv6): give the machine's IPv4 address") from None


# ---------------------------------------------------------------------------- timeouts

# How long a connection to a server may move no byte before the server is lost (EDGECAD_RPC_TIMEOUT overrides it).
# It must outlast the longest silence of a healthy server within one exchange: its layers' part of a pass (a prompt
# batch of 512 tokens through half of a 7-14B model on a laptop CPU takes some 10-40 s; more where the server's
# memory pages to slow storage) or a tensor of several hundred MB read from its --cache on an SD card (10-30 s).
# 120 s is several times those; a transfer that moves bytes never times out, however slow. A machine that sleeps
# or leaves the network is noticed sooner, in about 25 s, by TCP keepalive (native/remote.c).
TIMEOUT = 120.0
# How long a Ctrl-C lets a watched call stop by itself (llama.cpp stops a graph at its next node; a healthy
# server's part of a pass ends) before the remote devices are given up; a second Ctrl-C gives up at once.
GRACE = 1.0


def timeout() -> float:
    """Seconds of silence after which a server is lost: EDGECAD_RPC_TIMEOUT, else TIMEOUT."""
    v = os.environ.get("EDGECAD_RPC_TIMEOUT", "").strip()
    if not v:
        return TIMEOUT
    try:
        t = float(v)
    except ValueError:
        t = -1.0
    if not 0.001 <= t <= 4e6:
        raise EdgecadError(f"EDGECAD_RPC_TIMEOUT={v!r} is not a number of seconds above 0: unset it (the default "
                           f"is {TIMEOUT:.0f} s) or give e.g. 300 for a server that is slow to answer")
    return t


_warned = []


def sockets() -> None:
    """Keepalive and timeouts on every connection ggml's RPC backend makes from now on (native/remote.c). Where
    they cannot be set (not Linux), one warning: a server that stops answering is then waited for until TCP gives
    up, or for good."""
    rc = native.lib.ec_remote_sockets_install(address("ggml_backend_rpc_add_server"), timeout())
    if rc == native.EC_EUNSUPPORTED and not _warned:
        _warned.append(True)
        sys.stderr.write(f"edgecad: warning: no timeout on remote devices here "
                         f"({native.lib.ec_last_error().decode(errors='replace')}): a server that stops answering "
                         "is waited for until Ctrl-C\n")
    elif rc != native.EC_EUNSUPPORTED:
        native.check(rc, "ec_remote_sockets_install")
