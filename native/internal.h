/* edgecad native library: what its source files share. Not part of the interface (edgecad.h); hidden from
 * the library's exported symbols. */
#ifndef EDGECAD_INTERNAL_H
#define EDGECAD_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "edgecad.h"

#if defined(__linux__) && !defined(MADV_POPULATE_READ)
#define MADV_POPULATE_READ 22 /* Linux >= 5.14; older kernels answer EINVAL and we pread instead */
#endif

#define CHUNK ((uint64_t)8 << 20) /* bytes per read: large enough to keep the device busy */
#define EC_ERRBUF 512

#pragma GCC visibility push(hidden)

extern __thread char ec_errbuf[EC_ERRBUF]; /* this thread's message for ec_last_error() */
extern int ec_interrupted_flag;            /* set by the SIGINT handler (common.c, section 6) */

/* Record "what: strerror(err)" (or just "what" when err == 0) as this thread's message; return code. */
int fail(int code, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
size_t page_size(void);
/* open(path) read-only and its size; EC_EOPEN / EC_ESTAT with the message on failure (nothing left open). */
int open_file(const char *path, int *fd, uint64_t *size);
/* Pages of the page-aligned span covering [addr, addr+len) resident in RAM (mincore). */
int count_resident(const void *addr, uint64_t len, uint64_t *pages_out);
double now_s(void);                       /* CLOCK_MONOTONIC seconds */
void sleep_s(double s);
int cond_init(pthread_cond_t *c);         /* a condition variable whose timed waits use CLOCK_MONOTONIC */
void cond_wait_ms(pthread_cond_t *c, pthread_mutex_t *mu, long ms);
int interrupted(void);                    /* 1 once a SIGINT came since the last ec_interrupt_clear */

/* Portability: the one place where platforms differ (what each has: ec_capabilities). Each returns 0 or an
 * errno value, ENOTSUP where the platform has no such call. */
int drop_file_pages(int fd, uint64_t off, uint64_t len); /* posix_fadvise(DONTNEED): out of the page cache */
int no_readahead(int fd);                 /* POSIX_FADV_RANDOM; macOS: fcntl(F_RDAHEAD, 0) */
int populate_pages(void *addr, size_t len); /* madvise(MADV_POPULATE_READ): fault a mapped span in (Linux) */
/* path opened read-only for reads that bypass the page cache: O_DIRECT (Linux), F_NOCACHE (macOS); -1 with *err
 * where the file system refuses (tmpfs) or the platform has neither. */
int open_direct(const char *path, int *err);
/* Fault anonymous memory in, writable (MADV_POPULATE_WRITE; touching each page where the kernel has no such
 * advice). */
void populate_write(void *addr, size_t len);

#ifdef __linux__
/* Import slots (guard.c): the GOT entries through which a loaded object calls named functions, patched to hooks
 * (the load guard's mmap, remote.c's socket options). */
typedef struct {
    const char *name; /* the symbol imported */
    void *hook;       /* what to call instead */
} plt_hook;
typedef struct {
    void **slot;  /* the import slot (GOT entry) */
    void *saved;  /* the hook to write until patched; then the slot's value before the patch */
} plt_patch;
/* Append to patch[*n] (cap entries in all) the slots of `hooks` in the one loaded object whose path contains lib
 * (its path into path); EC_EUNSUPPORTED unless exactly one object matches. */
int plt_find(const char *lib, const plt_hook *hooks, size_t n_hooks, plt_patch *patch, int cap, int *n, char *path,
             size_t path_cap);
/* Write v into a slot; a read-only slot (RELRO) is made writable for the write and given its protection back. */
int plt_write(plt_patch *pp, void *v);
/* The path of the loaded shared object whose segments hold addr (a function of it); EC_EUNSUPPORTED if none. */
int plt_owner(const void *addr, char *path, size_t cap);
#endif

#pragma GCC visibility pop

#endif
