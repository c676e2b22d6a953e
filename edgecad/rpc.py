"""Other devices' memory through llama.cpp's RPC backend (ggml-rpc): `edgecad rpc-server` on one device,
`Engine(remote=["host:port"])` on the other.

A server exposes its CPU to the network. The engine registers each server as a ggml device and llama.cpp puts
whole target layers there (the last ones), sends their weights at load (the server's cache, `--cache`, spares
resending them on the next load) and runs them there in each pass: only activations cross the network. The
memory plan (edgecad.memory.plan_remote) gives each server as many layers as its announced memory holds; the
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

import ctypes
import errno
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import native
from .devices import _base, _ggml, cpu_device
from .errors import EdgecadError, RemoteLostError

DEFAULT_PORT = 50052  # llama.cpp's rpc-server's
BUILD_HINT = "install llama-cpp-python with llama.cpp's RPC backend: bash scripts/build_rpc.sh (docs/devices.md)"


# ---------------------------------------------------------------------------- bindings

# ggml_backend_reg_t ggml_backend_reg_by_name(const char *name);  (libggml: the registry)
_ggml.ggml_backend_reg_by_name.argtypes, _ggml.ggml_backend_reg_by_name.restype = [ctypes.c_char_p], ctypes.c_void_p
# void *ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char *name);
_base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
# size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg); ggml_backend_dev_t ggml_backend_reg_dev_get(reg, i);
_base.ggml_backend_reg_dev_count.argtypes, _base.ggml_backend_reg_dev_count.restype = [ctypes.c_void_p], ctypes.c_size_t
_base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
# ggml_abort_callback_t ggml_set_abort_callback(ggml_abort_callback_t callback);  (passed to C by address)
_SET_ABORT = ctypes.cast(_base.ggml_set_abort_callback, ctypes.c_void_p).value
# ggml_backend_reg_t ggml_backend_rpc_add_server(const char *endpoint);
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
# void ggml_backend_rpc_start_server(const char *endpoint, const char *cache_dir, size_t n_threads,
#                                    size_t n_devices, ggml_backend_dev_t *devices);
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p))


def _address(name: str) -> Optional[int]:
    """The address of a function of the RPC backend (through its registry entry, however llama.cpp was linked)."""
    from .llama import _init_backend
    _init_backend()  # (llama.cpp's log captured first: its RPC errors become one line)
    reg = _ggml.ggml_backend_reg_by_name(b"RPC")
    return _base.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None


def _rpc(name: str, prototype):
    """A function of the RPC backend, or None."""
    addr = _address(name)
    return prototype(addr) if addr else None


def available() -> bool:
    """This llama.cpp has the RPC backend."""
    return _rpc("ggml_backend_rpc_add_server", _ADD_SERVER) is not None


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


def _sockets() -> None:
    """Keepalive and timeouts on every connection ggml's RPC backend makes from now on (native/remote.c). Where
    they cannot be set (not Linux), one warning: a server that stops answering is then waited for until TCP gives
    up, or for good."""
    rc = native.lib.ec_remote_sockets_install(_address("ggml_backend_rpc_add_server"), timeout())
    if rc == native.EC_EUNSUPPORTED and not _warned:
        _warned.append(True)
        sys.stderr.write(f"edgecad: warning: no timeout on remote devices here "
                         f"({native.lib.ec_last_error().decode(errors='replace')}): a server that stops answering "
                         "is waited for until Ctrl-C\n")
    elif rc != native.EC_EUNSUPPORTED:
        native.check(rc, "ec_remote_sockets_install")


# ---------------------------------------------------------------------------- watched calls

class RemoteInterrupted(RemoteLostError, KeyboardInterrupt):
    """A Ctrl-C gave up on a call that waited on a remote device: both what the user did (a KeyboardInterrupt, which
    the chat and the server handle as such) and a lost device (a RemoteLostError, which close skips)."""


def _trap() -> None:
    native.check(native.lib.ec_remote_trap_install(_SET_ABORT), "ec_remote_trap_install")


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


# ---------------------------------------------------------------------------- the client

@dataclass(frozen=True)
class RemoteDevice:
    endpoint: str        # host:port of its rpc-server
    name: str            # ggml's name: "RPC0", "RPC1", ...
    handle: int          # its ggml_backend_dev_t
    memory_free: int     # bytes, as the server announces them
    memory_total: int


def connect(endpoints: list[str]) -> list[RemoteDevice]:
    """Each server's devices, registered with ggml (not with the registry llama.cpp picks its default devices
    from: only the target, given them explicitly, uses them). One line for a server that is unreachable."""
    require()
    _sockets()
    add = _rpc("ggml_backend_rpc_add_server", _ADD_SERVER)
    out = []
    for ep in dict.fromkeys(f"{h}:{p}" for h, p in map(parse_endpoint, endpoints)):  # (each server once)
        probe(ep)
        reg = watched(add, ep.encode(), what=f"connecting to {ep}")
        n = _base.ggml_backend_reg_dev_count(reg) if reg else 0
        if n == 0:
            raise RemoteLostError(f"remote device {ep} exposes no device: is it an `edgecad rpc-server` of "
                                  "the same llama.cpp version?")
        for i in range(n):
            dev = _base.ggml_backend_reg_dev_get(reg, i)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            watched(_base.ggml_backend_dev_memory, dev, ctypes.byref(free), ctypes.byref(total),
                    what=f"asking {ep} its memory")
            out.append(RemoteDevice(ep, _base.ggml_backend_dev_name(dev).decode(), dev, free.value, total.value))
    return out


def forget_layers(path, info, first: int) -> None:
    """Drop what the load read of layers first.. to send them (never read here again): out of this process's
    mappings of the file (llama.cpp read them through its mapping), then out of the page cache. Whole pages
    only: a page shared with a local layer stays."""
    import mmap
    import os
    from .pager import file_mappings
    page, libc = mmap.PAGESIZE, ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    spans = [(-(-l.start // page) * page, l.end // page * page) for l in info.layers()[first:]]
    for addr, off, length in file_mappings(path):
        for lo, hi in spans:
            lo, hi = max(lo, off), min(hi, off + length)
            if hi > lo:
                libc.madvise(addr + lo - off, hi - lo, mmap.MADV_DONTNEED)  # (best effort)
    fd = os.open(path, os.O_RDONLY)
    try:
        for lo, hi in spans:
            os.posix_fadvise(fd, lo, max(hi - lo, 0), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the server

def announce(dev: int, free: int, total: int) -> None:
    """Make `dev` report `free` of `total` bytes (what a server announces), and check that it took."""
    native.check(native.lib.ec_device_announce_memory(dev, free, total), "ec_device_announce_memory")
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    _base.ggml_backend_dev_memory(dev, ctypes.byref(f), ctypes.byref(t))
    if (f.value, t.value) != (free, total):
        raise EdgecadError("cannot set the memory this device announces (the ggml device layout differs from "
                           "the one edgecad was written for): reinstall with the pinned llama-cpp-python")


def serve(host: str, port: int, *, n_threads: int, cache_dir: Optional[str] = None) -> None:
    """Run llama.cpp's RPC server on this device's CPU (returns only when it fails to start). host: an IPv4
    address or a name that has one (parse_endpoint)."""
    require()
    host, port = parse_endpoint(f"{host}:{port}")
    _sockets()  # (keepalive on the engines' connections: one whose machine left no longer holds this server)
    start = _rpc("ggml_backend_rpc_start_server", _START_SERVER)
    devs = (ctypes.c_void_p * 1)(cpu_device())
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devs)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`edgecad rpc-server` in a process of its own on loopback (the bench's second device, the tests' server), in
    a memory cgroup of `budget` bytes when one is given and a cgroup can be made; listening once constructed."""

    def __init__(self, budget: Optional[int] = None, *, cache: Optional[str] = None, threads: Optional[int] = None):
        from . import cgroup
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
