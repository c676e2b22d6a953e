"""Every foreign function edgecad calls besides llama-cpp-python's own bindings: edgecad's C library (native/:
common.c, pager.c, guard.c, remote.c; interface edgecad.h), ggml's device registry and ggml-rpc (section 9).

The library is built by `pip install .` into this package's directory;
EDGECAD_NATIVE_LIB=/path/to/libedgecad.so overrides where it is loaded from.
Each binding is declared once, with its C prototype beside it.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Optional

import llama_cpp as C

from .errors import ModelFileError, NativeError

_NAMES = {"darwin": "libedgecad.dylib", "win32": "edgecad.dll"}


def _candidates() -> list[Path]:
    """Where the library may be: beside this file (an installed package), else in the installed
    distribution (Python started inside a source checkout imports the sources, which have none)."""
    name = _NAMES.get(sys.platform, "libedgecad.so")
    out = [Path(__file__).with_name(name)]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        out.append(Path(distribution("edgecad").locate_file(f"edgecad/{name}")))
    except (ImportError, PackageNotFoundError):
        pass
    return out


def _load() -> ctypes.CDLL:
    override = os.environ.get("EDGECAD_NATIVE_LIB")
    paths = [Path(override)] if override else _candidates()
    found = [p for p in paths if p.exists()]
    if not found:
        raise NativeError(
            f"edgecad's native library is missing at {paths[0]}: install edgecad with `pip install .` "
            "(it builds native/ with CMake), or set EDGECAD_NATIVE_LIB to a built libedgecad"
        )
    return ctypes.CDLL(str(found[0]))


EC_VERSION = 15  # native/edgecad.h: the interface these bindings are written for
lib = _load()
_u64p = ctypes.POINTER(ctypes.c_uint64)

# ---------------------------------------------------------------------------- status codes (section 1)

# native/edgecad.h's enum, checked against the library's own names at load (check_version)
EC_OK, EC_EINVAL, EC_EOPEN, EC_ESTAT, EC_EMMAP, EC_EMINCORE, EC_ENOMEM, EC_ETHREAD, EC_ECHANGED, EC_EIO, \
    EC_EUNSUPPORTED, EC_ECANCELED = range(12)
_CODES = {k: v for k, v in globals().items() if k.startswith("EC_E") or k == "EC_OK"}
EC_FAULT_POPULATE_NOOP = 1000  # ec_pager_inject_fault: MADV_POPULATE_READ succeeds without reading (tests)
CAPABILITIES = {"drop_pages": 1, "populate": 2, "load_guard": 4, "find_mapping": 8}  # ec_capabilities' bits

# int ec_version(void);
lib.ec_version.argtypes, lib.ec_version.restype = [], ctypes.c_int
# const char *ec_last_error(void);
lib.ec_last_error.argtypes, lib.ec_last_error.restype = [], ctypes.c_char_p
# const char *ec_status_name(int code);
lib.ec_status_name.argtypes, lib.ec_status_name.restype = [ctypes.c_int], ctypes.c_char_p


def check_version() -> None:
    """Raise if the loaded library was built from another version of native/edgecad.h."""
    if lib.ec_version() != EC_VERSION:
        raise NativeError(f"edgecad's native library has interface {lib.ec_version()}, this Python code needs "
                          f"{EC_VERSION}: reinstall edgecad (`pip install .`) so both come from the same source")
    for name, code in _CODES.items():
        if (lib.ec_status_name(code) or b"").decode() != name:
            raise NativeError(f"edgecad's native library calls status {code} {lib.ec_status_name(code)!r}, not "
                              f"{name}: reinstall edgecad (`pip install .`)")


def check(code: int, what: str, path=None) -> None:
    """The one map from a status code to an exception: Ctrl-C is KeyboardInterrupt, a model file that changed
    under the pager a ModelFileError naming it, anything else a NativeError with the code and C's message."""
    if code == EC_OK:
        return
    if code == EC_ECANCELED:
        raise KeyboardInterrupt
    if code == EC_ECHANGED and path is not None:
        raise ModelFileError(f"{path} changed size while the engine was paging it: load it again once the file "
                             "is complete")
    msg = lib.ec_last_error().decode(errors="replace")
    raise NativeError(f"{what} failed (EC code {code}): {msg}", code)


# ---------------------------------------------------------------------------- residency (section 2)

# int ec_mem_resident(const void *addr, uint64_t len, uint64_t *resident_bytes);
lib.ec_mem_resident.argtypes, lib.ec_mem_resident.restype = [ctypes.c_void_p, ctypes.c_uint64, _u64p], ctypes.c_int
# int ec_file_resident(const char *path, uint64_t offset, uint64_t len, uint64_t *resident_bytes);
lib.ec_file_resident.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64, _u64p]
lib.ec_file_resident.restype = ctypes.c_int


def mem_resident(addr: int, length: int) -> int:
    """Bytes of the pages covering [addr, addr+length) that are resident in RAM."""
    out = ctypes.c_uint64()
    check(lib.ec_mem_resident(addr, length, ctypes.byref(out)), "ec_mem_resident")
    return out.value


def file_resident(path: str | os.PathLike, offset: int = 0, length: int = 1 << 62) -> int:
    """Bytes of the file range [offset, offset+length) that are in the page cache."""
    out = ctypes.c_uint64()
    check(lib.ec_file_resident(os.fsencode(path), offset, length, ctypes.byref(out)), "ec_file_resident")
    return out.value


# ---------------------------------------------------------------------------- pager (section 3)

class Range(ctypes.Structure):  # ec_range
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class PagerParams(ctypes.Structure):  # ec_pager_params
    _fields_ = [("depth", ctypes.c_int), ("lag", ctypes.c_int), ("throttle_bps", ctypes.c_double),
                ("measure", ctypes.c_int), ("readahead", ctypes.c_int), ("owned", ctypes.c_int)]


class PagerStats(ctypes.Structure):  # ec_pager_stats
    _fields_ = [(n, ctypes.c_uint64) for n in ("bytes_read", "io_wait_ns", "io_busy_ns", "resident_now",
                                                "peak_resident", "boundaries", "passes", "advise_failures",
                                                "gate_wait_ns", "draft_layers_in_pass", "populate_ignored",
                                                "owned_bytes", "direct_reads", "owned_weights")]


class Tensor(ctypes.Structure):  # ec_tensor
    _fields_ = [("name", ctypes.c_char_p), ("off", ctypes.c_uint64), ("layer", ctypes.c_int)]


_RP, _vp = ctypes.POINTER(Range), ctypes.c_void_p


class PagerSpec(ctypes.Structure):  # ec_pager_spec
    _fields_ = [("path", ctypes.c_char_p), ("map_addr", ctypes.c_uint64), ("map_offset", ctypes.c_uint64),
                ("map_len", ctypes.c_uint64), ("layers", _RP), ("streamed", ctypes.POINTER(ctypes.c_uint8)),
                ("n_layers", ctypes.c_int), ("pinned", _RP), ("n_pinned", ctypes.c_int), ("evict_each_pass", _RP),
                ("n_evict", ctypes.c_int), ("params", PagerParams), ("name_fn", _vp),
                ("tensors", ctypes.POINTER(Tensor)), ("n_tensors", ctypes.c_int)]


# int ec_pager_open(const ec_pager_spec *spec, ec_pager **out);
lib.ec_pager_open.argtypes = [ctypes.POINTER(PagerSpec), ctypes.POINTER(_vp)]
lib.ec_pager_open.restype = ctypes.c_int
# void ec_pager_close(ec_pager *p);
lib.ec_pager_close.argtypes, lib.ec_pager_close.restype = [_vp], None
# int ec_pager_settle(ec_pager *p);
lib.ec_pager_settle.argtypes, lib.ec_pager_settle.restype = [_vp], ctypes.c_int
# bool ec_pager_cb_eval(void *tensor, bool ask, void *user_data);  (llama.cpp's cb_eval, passed by address)
lib.ec_pager_cb_eval.argtypes, lib.ec_pager_cb_eval.restype = [_vp, ctypes.c_bool, _vp], ctypes.c_bool
# int ec_pager_get_stats(ec_pager *p, ec_pager_stats *out);
lib.ec_pager_get_stats.argtypes = [_vp, ctypes.POINTER(PagerStats)]
lib.ec_pager_get_stats.restype = ctypes.c_int
# void ec_pager_reset_peak(ec_pager *p);
lib.ec_pager_reset_peak.argtypes, lib.ec_pager_reset_peak.restype = [_vp], None
# int ec_pager_pass_begin(ec_pager *p);  int ec_pager_pass_end(ec_pager *p);
lib.ec_pager_pass_begin.argtypes, lib.ec_pager_pass_begin.restype = [_vp], ctypes.c_int
lib.ec_pager_pass_end.argtypes, lib.ec_pager_pass_end.restype = [_vp], ctypes.c_int
# bool ec_pager_gate_cb_eval(void *tensor, bool ask, void *user_data);  (the draft's cb_eval, by address)
lib.ec_pager_gate_cb_eval.argtypes, lib.ec_pager_gate_cb_eval.restype = [_vp, ctypes.c_bool, _vp], ctypes.c_bool
# int ec_pager_inject_fault(ec_pager *p, int code);
lib.ec_pager_inject_fault.argtypes, lib.ec_pager_inject_fault.restype = [_vp, ctypes.c_int], ctypes.c_int
# int ec_pager_set_throttle(ec_pager *p, double bytes_per_second);
lib.ec_pager_set_throttle.argtypes, lib.ec_pager_set_throttle.restype = [_vp, ctypes.c_double], ctypes.c_int
# int ec_pager_error(ec_pager *p);
lib.ec_pager_error.argtypes, lib.ec_pager_error.restype = [_vp], ctypes.c_int
# int ec_tensor_layout(uint64_t *offsets, int n);
lib.ec_tensor_layout.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
lib.ec_tensor_layout.restype = ctypes.c_int
pager_cb_eval_address = ctypes.cast(lib.ec_pager_cb_eval, _vp).value
gate_cb_eval_address = ctypes.cast(lib.ec_pager_gate_cb_eval, _vp).value

# ---------------------------------------------------------------------------- bandwidth (section 4)

# int ec_read_bandwidth(const char *path, uint64_t offset, uint64_t len, double *bytes_per_second);
lib.ec_read_bandwidth.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_double)]
lib.ec_read_bandwidth.restype = ctypes.c_int

# ---------------------------------------------------------------------------- load guard (section 5)


class GuardStats(ctypes.Structure):  # ec_load_guard_stats
    _fields_ = [("populate_dropped", ctypes.c_uint64), ("willneed_dropped", ctypes.c_uint64),
                ("mapped_bytes", ctypes.c_uint64), ("slots", ctypes.c_int)]


# int ec_load_guard_begin(const char *path, const char *lib_name);
lib.ec_load_guard_begin.argtypes, lib.ec_load_guard_begin.restype = [ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int
# int ec_load_guard_end(ec_load_guard_stats *out);
lib.ec_load_guard_end.argtypes, lib.ec_load_guard_end.restype = [ctypes.POINTER(GuardStats)], ctypes.c_int

# int ec_capabilities(void);
lib.ec_capabilities.argtypes, lib.ec_capabilities.restype = [], ctypes.c_int


def capabilities() -> dict:
    """What this platform's build of the C library can do (native/edgecad.h: ec_capabilities)."""
    bits = lib.ec_capabilities()
    return {name: bool(bits & bit) for name, bit in CAPABILITIES.items()}


def can_page() -> bool:
    """Paging a target needs the owned residency (native/owned.c: direct reads into memory it owns; a Mac's build
    too), or else dropping a file's pages and finding llama.cpp's mapping of it (the page cache's)."""
    caps = capabilities()
    return owned_supported() or (caps["drop_pages"] and caps["find_mapping"])


# ---------------------------------------------------------------------------- interrupt (section 6)

# int ec_interrupt_install(void); void ec_interrupt_clear(void); int ec_interrupt_pending(void);
# int ec_interrupt_count(void);
lib.ec_interrupt_install.argtypes, lib.ec_interrupt_install.restype = [], ctypes.c_int
lib.ec_interrupt_clear.argtypes, lib.ec_interrupt_clear.restype = [], None
lib.ec_interrupt_pending.argtypes, lib.ec_interrupt_pending.restype = [], ctypes.c_int
lib.ec_interrupt_count.argtypes, lib.ec_interrupt_count.restype = [], ctypes.c_int
# bool ec_abort_callback(void *data);  (llama.cpp's abort callback, passed by address)
abort_callback_address = ctypes.cast(lib.ec_abort_callback, _vp).value


def install_interrupt() -> None:
    """Let Ctrl-C stop C code that waits (a pass waiting on storage, the pinned reads, a llama.cpp graph):
    only while Ctrl-C means KeyboardInterrupt (Python's default handler), which it still raises."""
    import signal
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        lib.ec_interrupt_install()


# ---------------------------------------------------------------------------- log (section 7)

# void ec_log_set_verbose(int verbose); int ec_log_take_errors(char *out, size_t cap, int last);
lib.ec_log_set_verbose.argtypes, lib.ec_log_set_verbose.restype = [ctypes.c_int], None
lib.ec_log_take_errors.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
lib.ec_log_take_errors.restype = ctypes.c_int
# void ec_log_callback(int level, const char *text, void *user_data);  (passed to llama_log_set by address)
log_callback_address = ctypes.cast(lib.ec_log_callback, _vp).value


def take_log_errors(last: int = 3) -> str:
    """The last error lines llama.cpp logged since the previous call."""
    buf = ctypes.create_string_buffer(1024)
    lib.ec_log_take_errors(buf, len(buf), last)
    return buf.value.decode(errors="replace")


# ---------------------------------------------------------------------------- remote devices (section 8)

# int ec_remote_trap_install(void *set_abort_callback); int ec_remote_lost(char *out, size_t cap);
# int ec_remote_lost_errno(void);
lib.ec_remote_trap_install.argtypes, lib.ec_remote_trap_install.restype = [_vp], ctypes.c_int
lib.ec_remote_lost.argtypes, lib.ec_remote_lost.restype = [ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int
lib.ec_remote_lost_errno.argtypes, lib.ec_remote_lost_errno.restype = [], ctypes.c_int
# int ec_remote_sockets_install(void *rpc_function, double timeout_seconds); int ec_remote_give_up(const char *why);
lib.ec_remote_sockets_install.argtypes, lib.ec_remote_sockets_install.restype = [_vp, ctypes.c_double], ctypes.c_int
lib.ec_remote_give_up.argtypes, lib.ec_remote_give_up.restype = [ctypes.c_char_p], ctypes.c_int
# int ec_device_announce_memory(void *dev, uint64_t free, uint64_t total);
lib.ec_device_announce_memory.argtypes = [_vp, ctypes.c_uint64, ctypes.c_uint64]
lib.ec_device_announce_memory.restype = ctypes.c_int


def remote_lost() -> Optional[str]:
    """ggml's message when a remote device was lost in this process (ec_remote_lost), else None."""
    buf = ctypes.create_string_buffer(512)
    return buf.value.decode(errors="replace") if lib.ec_remote_lost(buf, len(buf)) else None


# ---------------------------------------------------------------------------- ggml (section 9)
# ggml's device registry (the compute devices of this build of llama.cpp) and its RPC backend, from the very
# libraries llama_cpp loaded.

def _ggml_lib(name: str) -> ctypes.CDLL:
    """One of the ggml libraries llama_cpp loaded ("ggml", "ggml-base"), from its package directory: the very
    copy libllama uses. (A wheel holds lib*.so, .so.0 and .so.0.x.y as three copies, not links, and libllama
    loads the .so.0: opening another would give this process a second ggml, with its own device registry and
    abort callback.)"""
    libdir = Path(C.__file__).parent / "lib"
    file = {"darwin": f"lib{name}.dylib", "win32": f"{name}.dll"}.get(sys.platform, f"lib{name}.so")
    try:
        with open("/proc/self/maps") as f:
            loaded = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
        file = next((Path(p).name for p in sorted(loaded) if Path(p).parent == libdir and
                     Path(p).name.startswith(file)), file)
    except OSError:  # (not Linux)
        pass
    return ctypes.CDLL(str(libdir / file))


ggml, ggml_base = _ggml_lib("ggml"), _ggml_lib("ggml-base")
# size_t ggml_backend_dev_count(void);  ggml_backend_dev_t ggml_backend_dev_get(size_t index);
ggml.ggml_backend_dev_count.argtypes, ggml.ggml_backend_dev_count.restype = [], ctypes.c_size_t
ggml.ggml_backend_dev_get.argtypes, ggml.ggml_backend_dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
# size_t ggml_backend_reg_count(void);  ggml_backend_reg_t ggml_backend_reg_get(size_t index);
ggml.ggml_backend_reg_count.argtypes, ggml.ggml_backend_reg_count.restype = [], ctypes.c_size_t
ggml.ggml_backend_reg_get.argtypes, ggml.ggml_backend_reg_get.restype = [ctypes.c_size_t], ctypes.c_void_p
# const char *ggml_backend_reg_name(ggml_backend_reg_t reg);
ggml_base.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
ggml_base.ggml_backend_reg_name.restype = ctypes.c_char_p
# const char *ggml_backend_dev_name(ggml_backend_dev_t device);  (and _description)
ggml_base.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
ggml_base.ggml_backend_dev_name.restype = ctypes.c_char_p
ggml_base.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
ggml_base.ggml_backend_dev_description.restype = ctypes.c_char_p
# enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
ggml_base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
ggml_base.ggml_backend_dev_type.restype = ctypes.c_int
# void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t *free, size_t *total);
ggml_base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                              ctypes.POINTER(ctypes.c_size_t)]
ggml_base.ggml_backend_dev_memory.restype = None
# ggml_backend_dev_t ggml_backend_dev_by_type(enum ggml_backend_dev_type type);
ggml.ggml_backend_dev_by_type.argtypes, ggml.ggml_backend_dev_by_type.restype = [ctypes.c_int], ctypes.c_void_p
# ggml_backend_buffer_type_t ggml_backend_dev_buffer_type(ggml_backend_dev_t device);
ggml_base.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
ggml_base.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
# const char *ggml_get_name(const struct ggml_tensor *tensor);  (the pager names a layer's tensors by address)
ggml_get_name_address = ctypes.cast(ggml_base.ggml_get_name, _vp).value


class GgmlInitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


# struct ggml_context *ggml_init(struct ggml_init_params params);  void ggml_free(struct ggml_context *ctx);
ggml_base.ggml_init.argtypes, ggml_base.ggml_init.restype = [GgmlInitParams], ctypes.c_void_p
ggml_base.ggml_free.argtypes, ggml_base.ggml_free.restype = [ctypes.c_void_p], None
# struct ggml_tensor *ggml_new_tensor_1d(struct ggml_context *ctx, enum ggml_type type, int64_t ne0);
ggml_base.ggml_new_tensor_1d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
ggml_base.ggml_new_tensor_1d.restype = ctypes.c_void_p
# struct ggml_tensor *ggml_add(struct ggml_context *ctx, struct ggml_tensor *a, struct ggml_tensor *b);
ggml_base.ggml_add.argtypes, ggml_base.ggml_add.restype = [ctypes.c_void_p] * 3, ctypes.c_void_p
# struct ggml_tensor *ggml_view_1d(struct ggml_context *ctx, struct ggml_tensor *a, int64_t ne0, size_t offset);
ggml_base.ggml_view_1d.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]
ggml_base.ggml_view_1d.restype = ctypes.c_void_p
# void *ggml_get_data(const struct ggml_tensor *tensor);  const char *ggml_get_name(...): by value, and by address
ggml_base.ggml_get_data.argtypes, ggml_base.ggml_get_data.restype = [ctypes.c_void_p], ctypes.c_void_p
ggml_base.ggml_get_name.argtypes, ggml_base.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_void_p


@functools.cache
def owned_supported() -> bool:
    """Whether the owned residency (native/owned.c) may point this ggml's tensors at its slots: the offsets of
    struct ggml_tensor's fields it was built with, checked on tensors of the ggml this process runs."""
    off = (ctypes.c_uint64 * 5)()
    check(lib.ec_tensor_layout(off, 5), "ec_tensor_layout")
    src, view_src, view_offs, data, name = off
    ctx = ggml_base.ggml_init(GgmlInitParams(1 << 16, None, False))
    if not ctx:
        return False
    try:
        a, b = ggml_base.ggml_new_tensor_1d(ctx, 0, 4), ggml_base.ggml_new_tensor_1d(ctx, 0, 4)  # GGML_TYPE_F32
        c, v = ggml_base.ggml_add(ctx, a, b), ggml_base.ggml_view_1d(ctx, a, 2, 8)
        at = lambda t, o: ctypes.c_void_p.from_address(t + o).value
        return (at(c, src) == a and at(c, src + ctypes.sizeof(ctypes.c_void_p)) == b and at(v, view_src) == a
                and ctypes.c_size_t.from_address(v + view_offs).value == 8
                and at(a, data) == ggml_base.ggml_get_data(a) and a + name == ggml_base.ggml_get_name(a))
    finally:
        ggml_base.ggml_free(ctx)


# ggml_backend_reg_t ggml_backend_reg_by_name(const char *name);  (libggml: the registry)
ggml.ggml_backend_reg_by_name.argtypes, ggml.ggml_backend_reg_by_name.restype = [ctypes.c_char_p], ctypes.c_void_p
# void *ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char *name);
ggml_base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
ggml_base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
# size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg); ggml_backend_dev_t ggml_backend_reg_dev_get(reg, i);
ggml_base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
ggml_base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
ggml_base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
ggml_base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
# ggml_abort_callback_t ggml_set_abort_callback(ggml_abort_callback_t callback);  (passed to C by address)
set_abort_callback_address = ctypes.cast(ggml_base.ggml_set_abort_callback, ctypes.c_void_p).value
# ggml_backend_reg_t ggml_backend_rpc_add_server(const char *endpoint);
RPC_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
# void ggml_backend_rpc_start_server(const char *endpoint, const char *cache_dir, size_t n_threads,
#                                    size_t n_devices, ggml_backend_dev_t *devices);
RPC_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                    ctypes.POINTER(ctypes.c_void_p))


def rpc_function(name: str, prototype):
    """A function of ggml's RPC backend (found through its registry entry, however llama.cpp was linked) as
    `prototype`, or None when this llama.cpp has no RPC backend."""
    addr = rpc_address(name)
    return prototype(addr) if addr else None


def rpc_address(name: str) -> Optional[int]:
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    return ggml_base.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None


# ---------------------------------------------------------------------------- libc (section 10)

libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: the C library's
# int madvise(void *addr, size_t length, int advice);
libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
