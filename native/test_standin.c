/*
 * A stand-in for libllama in the C test driver's load-guard check (native/test_driver.c): a shared library that
 * maps a model file as llama.cpp's src/llama-mmap.cpp does (MAP_POPULATE, then POSIX_MADV_WILLNEED over the whole
 * mapping), through its own import slots for mmap (or mmap64) and posix_madvise, which the guard patches.
 *
 *   cc -std=gnu11 -shared -fPIC -o libecstandin.so native/test_standin.c
 *   (with -D_FILE_OFFSET_BITS=64, glibc's headers make the call import mmap64 instead of mmap)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Map `path` from file offset `off` (page-aligned) to its end into *addr, *len; 0 or an errno value. (llama.cpp maps
 * from offset 0: a nonzero offset here also checks that the hooks pass the caller's offset through its ABI.) */
__attribute__((visibility("default"))) int ecstandin_map(const char *path, long long off, void **addr, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno;
    struct stat st;
    int err = fstat(fd, &st) != 0 ? errno : st.st_size <= off ? EINVAL : 0;
    if (err) {
        close(fd);
        return err;
    }
    *len = (size_t)(st.st_size - off);
    *addr = mmap(NULL, *len, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, (off_t)off);
    err = errno;
    close(fd);
    if (*addr == MAP_FAILED) return err;
    posix_madvise(*addr, *len, POSIX_MADV_WILLNEED); /* (as llama.cpp: a failed advice is only a warning) */
    return 0;
}

/* The name of the symbol this library's mmap call imports. */
__attribute__((visibility("default"))) const char *ecstandin_mmap_symbol(void) {
#if defined(__GLIBC__) && defined(__USE_FILE_OFFSET64)
    return "mmap64";
#else
    return "mmap";
#endif
}
