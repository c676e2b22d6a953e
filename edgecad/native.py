"""ctypes bindings of edgecad's C library (native/edgecad.c).

The library is built by `pip install .` into this package's directory;
EDGECAD_NATIVE_LIB=/path/to/libedgecad.so overrides where it is loaded from.
Each binding is declared once, with its C prototype beside it.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from .errors import NativeError

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


EC_VERSION = 8  # native/edgecad.h: the interface these bindings are written for
lib = _load()
_u64p = ctypes.POINTER(ctypes.c_uint64)

# int ec_version(void);
lib.ec_version.argtypes, lib.ec_version.restype = [], ctypes.c_int


def check_version() -> None:
    """Raise if the loaded library was built from another version of native/edgecad.h."""
    if lib.ec_version() != EC_VERSION:
        raise NativeError(f"edgecad's native library has interface {lib.ec_version()}, this Python code needs "
                          f"{EC_VERSION}: reinstall edgecad (`pip install .`) so both come from the same source")
# const char *ec_last_error(void);
lib.ec_last_error.argtypes, lib.ec_last_error.restype = [], ctypes.c_char_p
# int ec_mem_resident(const void *addr, uint64_t len, uint64_t *resident_bytes);
lib.ec_mem_resident.argtypes, lib.ec_mem_resident.restype = [ctypes.c_void_p, ctypes.c_uint64, _u64p], ctypes.c_int
# int ec_file_resident(const char *path, uint64_t offset, uint64_t len, uint64_t *resident_bytes);
lib.ec_file_resident.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64, _u64p]
lib.ec_file_resident.restype = ctypes.c_int


# int ec_interrupt_install(void); void ec_interrupt_clear(void); int ec_interrupt_pending(void);
lib.ec_interrupt_install.argtypes, lib.ec_interrupt_install.restype = [], ctypes.c_int
lib.ec_interrupt_clear.argtypes, lib.ec_interrupt_clear.restype = [], None
lib.ec_interrupt_pending.argtypes, lib.ec_interrupt_pending.restype = [], ctypes.c_int
# bool ec_abort_callback(void *data);  (llama.cpp's abort callback, passed by address)
abort_callback_address = ctypes.cast(lib.ec_abort_callback, ctypes.c_void_p).value


# void ec_log_set_verbose(int verbose); int ec_log_take_errors(char *out, size_t cap, int last);
lib.ec_log_set_verbose.argtypes, lib.ec_log_set_verbose.restype = [ctypes.c_int], None
lib.ec_log_take_errors.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
lib.ec_log_take_errors.restype = ctypes.c_int
# void ec_log_callback(int level, const char *text, void *user_data);  (passed to llama_log_set by address)
log_callback_address = ctypes.cast(lib.ec_log_callback, ctypes.c_void_p).value


def take_log_errors(last: int = 3) -> str:
    """The last error lines llama.cpp logged since the previous call."""
    buf = ctypes.create_string_buffer(1024)
    lib.ec_log_take_errors(buf, len(buf), last)
    return buf.value.decode(errors="replace")


def install_interrupt() -> None:
    """Let Ctrl-C stop C code that waits (a pass waiting on storage, the pinned reads, a llama.cpp graph):
    only while Ctrl-C means KeyboardInterrupt (Python's default handler), which it still raises."""
    import signal
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        lib.ec_interrupt_install()


def check(code: int, what: str) -> None:
    """Raise NativeError with the status code and the C library's message."""
    if code != 0:
        msg = lib.ec_last_error().decode(errors="replace")
        raise NativeError(f"{what} failed (EC code {code}): {msg}", code)


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
