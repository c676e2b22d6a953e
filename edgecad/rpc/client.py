"""The engine's side of remote devices: connecting to `edgecad rpc-server`s (their handshake checked first, with a
timeout) and running llama.cpp's calls that may reach them in watched threads (`watched`), given up when a device is
lost or after a Ctrl-C (edgecad.rpc's docstring says why)."""
from __future__ import annotations

import ctypes
import errno
import socket
import threading
import time
from typing import Callable

from .. import native
from ..errors import RemoteLostError
from ..native import RPC_ADD_SERVER, ggml_base
from ..plan import RemoteDevice
from . import GRACE, parse_endpoint, require, sockets, timeout

RPC_PROTO = (7, 0)  # (major, minor) of the pinned llama.cpp's ggml-rpc.h: RPC_PROTO_MAJOR/MINOR_VERSION
_HELLO = 14         # RPC_CMD_HELLO ("must be always 14"); its request: 24 bytes of connection capabilities


def probe(endpoint: str, timeout: float = 5.0) -> None:
    """Raise RemoteLostError with one line unless an RPC server of this protocol answers at `endpoint`
    (llama.cpp's handshake, with a timeout: ggml's own connect aborts the process on failure, and waits for good
    on a server that is busy with another client)."""
    host, port = parse_endpoint(endpoint)
    fix = f"start `edgecad rpc-server --port {port}` there, or check the address"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise RemoteLostError(f"remote device {host}:{port} is unreachable ({e.strerror or e}): {fix}") from None
    reply = b""
    try:
        with sock:
            sock.sendall(bytes([_HELLO]) + (24).to_bytes(8, "little") + bytes(24))
            while len(reply) < 8 + 28:
                part = sock.recv(8 + 28 - len(reply))
                if not part:
                    break
                reply += part
    except socket.timeout:
        raise RemoteLostError(f"remote device {host}:{port} did not answer within {timeout:.0f} s: an RPC server "
                              "serves one engine at a time, is another using it? Or " + fix) from None
    except OSError:
        pass  # (closed on us: judged below)
    if len(reply) < 36 or int.from_bytes(reply[:8], "little") != 28:
        raise RemoteLostError(f"{host}:{port} is not an RPC server of this llama.cpp (its answer to the handshake "
                              f"is not one): {fix}")
    major, minor = reply[8], reply[9]
    if major != RPC_PROTO[0] or minor > RPC_PROTO[1]:
        raise RemoteLostError(f"the RPC server at {host}:{port} speaks protocol {major}.{minor}, this llama.cpp "
                              f"{RPC_PROTO[0]}.{RPC_PROTO[1]}: install the same edgecad and scripts/build_rpc.sh "
                              "on both machines")


# ---------------------------------------------------------------------------- watched calls

class RemoteInterrupted(RemoteLostError, KeyboardInterrupt):
    """A Ctrl-C gave up on a call that waited on a remote device: both what the user did (a KeyboardInterrupt, which
    the chat and the server handle as such) and a lost device (a RemoteLostError, which close skips)."""


def _trap() -> None:
    native.check(native.lib.ec_remote_trap_install(native.set_abort_callback_address), "ec_remote_trap_install")


def _why() -> str:
    """Why the remote devices were lost, in words: from the errno where ggml's client failed, or its message."""
    err = native.lib.ec_remote_lost_errno()
    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
        return (f"a server sent nothing for {timeout():g} s: it was stopped, or is slower than EDGECAD_RPC_TIMEOUT "
                "allows")
    if err == errno.ETIMEDOUT:
        return "a server's machine stopped answering TCP: it sleeps, or left the network"
    why = native.remote_lost() or "lost"
    return why.split(": ", 1)[-1].strip() if "ggml-rpc.cpp:" in why else why  # (ggml's: after its file and line)


def lost_error(what: str) -> RemoteLostError:
    return RemoteLostError(f"a remote device was lost {what} ({_why()}): its layers of the target went with it; "
                           "this process cannot reach remote devices again, so start it again once the rpc-server "
                           "runs")


def _give_up(what: str) -> RemoteInterrupted:
    """Mark the remote devices lost and shut their connections (native/remote.c): the call given up fails in its
    thread and is parked there, never to touch the engine again."""
    native.lib.ec_remote_give_up(f"given up after a Ctrl-C: no answer within {GRACE:g} s".encode())
    return RemoteInterrupted(str(lost_error(what)))


def watched(fn: Callable, *args, what: str = "during a call"):
    """fn(*args) in a thread that is given up if a remote device is lost meanwhile (RemoteLostError). A Ctrl-C
    (in this thread's KeyboardInterrupt, or another's signal: the server's worker) lets the call stop by itself for
    GRACE seconds (llama.cpp stops at its own checks; KeyboardInterrupt is then raised here once it has returned, as
    without remote devices); a call still running then, or at a second Ctrl-C, is given up: the remote devices are
    lost from then on and RemoteInterrupted is raised at once (the call's thread may stay in C: what it used is
    never touched again)."""
    _trap()
    if native.remote_lost():
        raise lost_error(what)
    out, done, claim = [], threading.Event(), threading.Lock()

    def run():
        if not claim.acquire(blocking=False):
            return  # (another start of this call runs it)
        try:
            out.append((True, fn(*args)))
        except BaseException as e:  # (raised in the caller's thread)
            out.append((False, e))
        done.set()

    signals, raised, first = native.lib.ec_interrupt_count(), 0, None  # raised: KeyboardInterrupts here
    while True:  # (a KeyboardInterrupt anywhere in here is counted, never a way out while the call runs)
        try:
            # The thread starts in here: a Ctrl-C landing inside Thread.start() may come before or after the thread
            # began, and one that escaped left the call running under its caller (which then decoded again in the
            # same context: a crash). Unclaimed, it is started again; `claim` lets one thread run the call.
            if not claim.locked():
                threading.Thread(target=run, daemon=True, name="edgecad-remote").start()
            if done.wait(0.05):
                break
            n = max(native.lib.ec_interrupt_count() - signals, raised)  # Ctrl-Cs since the call began
            first = time.monotonic() if n and first is None else first
            verdict = ("lost" if native.remote_lost() else
                       "give up" if n and (n >= 2 or time.monotonic() - first >= GRACE) else None)
        except KeyboardInterrupt:
            raised += 1
            continue
        if verdict == "lost":
            raise lost_error(what)
        if verdict:
            raise _give_up(what)
    if raised:
        raise KeyboardInterrupt
    ok, value = out[0]
    if not ok:
        raise value
    return value


# ---------------------------------------------------------------------------- connecting

def connect(endpoints: list[str]) -> list[RemoteDevice]:
    """Each server's devices, registered with ggml (not with the registry llama.cpp picks its default devices
    from: only the target, given them explicitly, uses them). One line for a server that is unreachable."""
    require()
    sockets()
    add = native.rpc_function("ggml_backend_rpc_add_server", RPC_ADD_SERVER)
    out = []
    for ep in dict.fromkeys(f"{h}:{p}" for h, p in map(parse_endpoint, endpoints)):  # (each server once)
        probe(ep)
        reg = watched(add, ep.encode(), what=f"connecting to {ep}")
        n = ggml_base.ggml_backend_reg_dev_count(reg) if reg else 0
        if n == 0:
            raise RemoteLostError(f"remote device {ep} exposes no device: is it an `edgecad rpc-server` of "
                                  "the same llama.cpp version?")
        for i in range(n):
            dev = ggml_base.ggml_backend_reg_dev_get(reg, i)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            watched(ggml_base.ggml_backend_dev_memory, dev, ctypes.byref(free), ctypes.byref(total),
                    what=f"asking {ep} its memory")
            out.append(RemoteDevice(ep, ggml_base.ggml_backend_dev_name(dev).decode(), dev, free.value, total.value))
    return out
