/*
 * edgecad native library.
 *
 * Small, dependency-free C called from Python through ctypes. Every function
 * returns an EC_* status code (0 = success); on failure ec_last_error() gives
 * a message for the calling thread, naming the syscall and errno text.
 *
 * Sections:
 *   1. errors      status codes and the per-thread error message
 *   2. residency   how many bytes of a memory or file range are in RAM (mincore)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "edgecad.h"

/* ------------------------------------------------------------------------ */
/* 1. errors                                                                */
/* ------------------------------------------------------------------------ */

static __thread char ec_errbuf[512];

const char *ec_last_error(void) { return ec_errbuf; }

int ec_version(void) { return EC_VERSION; }

/* Record "what: strerror(errno)" (or just "what" when err == 0) and return code. */
static int fail(int code, int err, const char *fmt, ...) {
    char what[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (err)
        snprintf(ec_errbuf, sizeof ec_errbuf, "%s: %s", what, strerror(err));
    else
        snprintf(ec_errbuf, sizeof ec_errbuf, "%s", what);
    return code;
}

static size_t page_size(void) {
    static size_t ps;
    if (!ps) ps = (size_t)sysconf(_SC_PAGESIZE);
    return ps;
}

/* ------------------------------------------------------------------------ */
/* 2. residency                                                             */
/* ------------------------------------------------------------------------ */

/* Count resident pages of the page-aligned span covering [addr, addr+len). */
static int count_resident(const void *addr, uint64_t len, uint64_t *pages_out) {
    size_t ps = page_size();
    uintptr_t start = (uintptr_t)addr & ~(uintptr_t)(ps - 1);
    uintptr_t end = ((uintptr_t)addr + len + ps - 1) & ~(uintptr_t)(ps - 1);
    size_t npages = (end - start) / ps;
    unsigned char stackvec[4096];
    unsigned char *vec = npages <= sizeof stackvec ? stackvec : malloc(npages);
    if (!vec) return fail(EC_ENOMEM, errno, "malloc(%zu) for mincore", npages);
    if (mincore((void *)start, end - start, vec) != 0) {
        int err = errno;
        if (vec != stackvec) free(vec);
        return fail(EC_EMINCORE, err, "mincore(%p, %zu)", (void *)start, (size_t)(end - start));
    }
    uint64_t n = 0;
    for (size_t i = 0; i < npages; i++) n += vec[i] & 1;
    if (vec != stackvec) free(vec);
    *pages_out = n;
    return EC_OK;
}

int ec_mem_resident(const void *addr, uint64_t len, uint64_t *resident_bytes) {
    if (!addr || !resident_bytes) return fail(EC_EINVAL, 0, "ec_mem_resident: NULL argument");
    *resident_bytes = 0;
    if (len == 0) return EC_OK;
    uint64_t pages;
    int rc = count_resident(addr, len, &pages);
    if (rc) return rc;
    *resident_bytes = pages * page_size();
    return EC_OK;
}

int ec_file_resident(const char *path, uint64_t offset, uint64_t len, uint64_t *resident_bytes) {
    if (!path || !resident_bytes) return fail(EC_EINVAL, 0, "ec_file_resident: NULL argument");
    *resident_bytes = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(EC_EOPEN, errno, "open(%s)", path);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return fail(EC_ESTAT, err, "fstat(%s)", path);
    }
    uint64_t size = (uint64_t)st.st_size;
    if (offset >= size || len == 0) {
        close(fd);
        return EC_OK;
    }
    if (len > size - offset) len = size - offset;
    uint64_t aligned = offset & ~(uint64_t)(page_size() - 1);
    size_t maplen = (size_t)(len + (offset - aligned));
    /* A fresh shared mapping faults nothing in: mincore then reports the page cache. */
    void *p = mmap(NULL, maplen, PROT_READ, MAP_SHARED, fd, (off_t)aligned);
    if (p == MAP_FAILED) {
        int err = errno;
        close(fd);
        return fail(EC_EMMAP, err, "mmap(%s, offset %llu, %zu bytes)", path,
                    (unsigned long long)aligned, maplen);
    }
    uint64_t pages;
    int rc = count_resident(p, maplen, &pages);
    munmap(p, maplen);
    close(fd);
    if (rc) return rc;
    *resident_bytes = pages * page_size();
    return EC_OK;
}
