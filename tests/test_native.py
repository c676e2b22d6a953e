"""The C library's residency queries (mincore), on real files and memory."""
import mmap
import os

import pytest

from edgecad import native
from edgecad.errors import NativeError

PAGE = mmap.PAGESIZE


def test_file_residency_follows_the_page_cache(tmp_path):
    p = tmp_path / "blob"
    size = 256 * PAGE
    p.write_bytes(os.urandom(size))
    with open(p, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    dropped = native.file_resident(p)
    p.read_bytes()
    assert native.file_resident(p) == size
    assert dropped < size // 2
    assert native.file_resident(p, 10 * PAGE, 5 * PAGE) == 5 * PAGE
    assert native.file_resident(p, size + PAGE, PAGE) == 0  # past the end


def test_memory_residency_counts_touched_pages():
    n = 64
    m = mmap.mmap(-1, n * PAGE)
    try:
        import ctypes
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert native.mem_resident(addr, n * PAGE) == 0
        for i in range(0, n, 2):
            m[i * PAGE] = 1
        assert native.mem_resident(addr, n * PAGE) == n // 2 * PAGE
    finally:
        del addr
        m.close()


def test_errors_carry_code_and_message(tmp_path):
    with pytest.raises(NativeError) as e:
        native.file_resident(tmp_path / "missing")
    assert e.value.code == 2 and "open(" in str(e.value) and "No such file" in str(e.value)
