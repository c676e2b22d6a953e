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
 *   3. pager       stream a model's layers through a memory budget: an IO thread that reads
 *                  ahead and evicts, driven by llama.cpp's cb_eval at every layer boundary
 *   4. bandwidth   sequential read speed of a file after dropping it from the page cache
 *   5. load guard  llama.cpp's load of a paged model maps it without reading it all (PLT hooks)
 *   6. interrupt   Ctrl-C reaches C code that waits (a pass waiting on storage, the pinned reads)
 *   7. log         llama.cpp's log callback, in C: Python run inside a llama.cpp call would lose a Ctrl-C
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#ifdef __linux__
#include <link.h>
#endif
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

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux >= 5.14; older kernels answer EINVAL and we pread instead */
#endif

#include "edgecad.h"

/* ------------------------------------------------------------------------ */
/* 1. errors                                                                */
/* ------------------------------------------------------------------------ */

static __thread char ec_errbuf[512];

const char *ec_last_error(void) { return ec_errbuf; }

int ec_version(void) { return EC_VERSION; }

const char *ec_status_name(int code) {
    static const char *names[] = {"EC_OK", "EC_EINVAL", "EC_EOPEN", "EC_ESTAT", "EC_EMMAP", "EC_EMINCORE",
                                  "EC_ENOMEM", "EC_ETHREAD", "EC_ECHANGED", "EC_EIO", "EC_EUNSUPPORTED",
                                  "EC_ECANCELED"};
    return code >= 0 && code < (int)(sizeof names / sizeof names[0]) ? names[code] : NULL;
}

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

static size_t page_size(void) { /* any thread may ask first: the cache is an atomic */
    static size_t ps;
    size_t v = __atomic_load_n(&ps, __ATOMIC_RELAXED);
    if (!v) __atomic_store_n(&ps, v = (size_t)sysconf(_SC_PAGESIZE), __ATOMIC_RELAXED);
    return v;
}

/* Condition variables whose timed waits use CLOCK_MONOTONIC: a clock step (a Pi without an RTC syncing its
 * time) must not stretch or shorten a wait. Returns 0 or the pthread error. */
static int cond_init(pthread_cond_t *c) {
    pthread_condattr_t a;
    int rc = pthread_condattr_init(&a);
    if (!rc) rc = pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    if (!rc) rc = pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
    return rc;
}

/* Wait on c for at most ms milliseconds (mu held): callers loop on their condition and on Ctrl-C. */
static void cond_wait_ms(pthread_cond_t *c, pthread_mutex_t *mu, long ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000, ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    pthread_cond_timedwait(c, mu, &ts);
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

/* Set by the SIGINT handler (section 6), read by every thread where C code waits: an atomic int (lock-free,
 * so async-signal-safe), never a plain volatile shared across threads. */
static int ec_interrupted_flag;
static int interrupted(void) { return __atomic_load_n(&ec_interrupted_flag, __ATOMIC_ACQUIRE); }

/* ------------------------------------------------------------------------ */
/* 3. pager                                                                 */
/* ------------------------------------------------------------------------ */

enum { OP_LOAD = 1, OP_EVICT = 2, OP_EVICT_PASS = 3, OP_STOP = 4 };

typedef struct {
    int op;    /* OP_* */
    int layer; /* layer index for OP_LOAD / OP_EVICT */
} io_op;

struct ec_pager {
    int fd;                  /* the GGUF file: fstat, fadvise, pread */
    uint64_t file_size;      /* size at open; a change means the file was replaced or truncated */
    uint8_t *map;            /* llama.cpp's mapping: address of file offset map_off */
    uint64_t map_off;        /* file offset of the mapping's first byte */
    uint64_t map_len;        /* bytes mapped */
    int n_layers;
    ec_range *layers;        /* [n_layers] file range of each layer */
    uint8_t *streamed;       /* [n_layers] 1 = streamed, 0 = pinned */
    int n_stream;
    int *ring;               /* [n_stream] layer index of the j-th streamed layer, in compute order */
    int *ring_pos;           /* [n_layers] position of the layer in ring, -1 if pinned */
    int *next_ring;          /* [n_layers] ring position of the first streamed layer after layer il */
    int *file_prev;          /* [n_layers] the streamed layer just before layer il in the file, -1 if none */
    int *file_next;          /* [n_layers] the streamed layer just after layer il in the file, -1 if none */
    ec_range *pinned;        /* [n_pinned] ranges kept resident (output, norms) */
    int n_pinned;
    ec_range *evict_pass;    /* [n_evict] ranges dropped once per pass (token embeddings) */
    int n_evict;
    ec_pager_params prm;
    const char *(*name_fn)(const void *); /* ggml_get_name */

    /* IO thread and its FIFO queue, all guarded by mu */
    pthread_t io;
    int io_started;
    pthread_mutex_t mu;
    pthread_cond_t work;     /* signalled when an op is queued */
    pthread_cond_t done;     /* broadcast when an op completes */
    pthread_cond_t gate;     /* broadcast when the target starts waiting on IO or its pass ends */
    int in_pass;             /* 1 from the target's first layer boundary until ec_pager_pass_end */
    int closing;             /* 1 once ec_pager_close started: reads stop, the gate lets go (atomic) */
    int gate_users;          /* draft threads inside ec_pager_gate_cb_eval (close waits for them to leave) */
    int waiting;             /* 1 while the target waits at a boundary for a layer to be read */
    io_op *q;                /* [q_cap] ring buffer of queued ops */
    int q_cap, q_head, q_len;
    uint64_t queued;         /* tickets handed out (ops queued so far) */
    uint64_t completed;      /* ops completed; ops complete in queue order */
    uint8_t *want;           /* [n_layers] 1 = loaded once the queue drains */
    uint64_t *load_ticket;   /* [n_layers] ticket of the latest LOAD of the layer */
    int error;               /* first EC_* error of the IO thread; cb_eval then aborts the graph */
    char error_text[512];    /* the IO thread's message for `error` */
    int inject;              /* tests: the next read fails with this EC_* code (ec_pager_inject_fault) */
    double next_free_s;      /* throttle: when the next chunk may start (IO thread only) */
    double throttle_bps;     /* the throttle now: prm.throttle_bps, or what ec_pager_set_throttle set (atomic) */
    int use_populate;        /* 1 while MADV_POPULATE_READ works (IO thread only) */
    uint8_t *scratch;        /* [CHUNK] pread fallback buffer (IO thread only) */

    /* residency, in bytes, last measured (compute thread only) */
    uint64_t *layer_res;     /* [n_layers] */
    uint8_t *remeasure;      /* [n_layers] 1 = evicted since last measured (set by the IO thread, under mu) */
    uint64_t fixed_res;      /* pinned ranges + pinned layers + evict_pass ranges */
    ec_pager_stats st;       /* guarded by mu */
};

#define CHUNK ((uint64_t)8 << 20) /* bytes per read: large enough to keep the device busy */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void warn_once(ec_pager *p, const char *what, int err) {
    pthread_mutex_lock(&p->mu);
    int first = p->st.advise_failures++ == 0;
    pthread_mutex_unlock(&p->mu);
    if (first) fprintf(stderr, "edgecad: warning: %s failed: %s (residency may exceed the budget)\n", what, strerror(err));
}

/* Page-aligned span of the mapping covering a file range: outward (to read) or inward (to drop). */
static int span(const ec_pager *p, uint64_t off, uint64_t len, int outward, uint8_t **addr, size_t *n) {
    uint64_t ps = page_size();
    if (off < p->map_off) { len = len > p->map_off - off ? len - (p->map_off - off) : 0; off = p->map_off; }
    if (off - p->map_off >= p->map_len) return 0;
    if (off - p->map_off + len > p->map_len) len = p->map_len - (off - p->map_off);
    uintptr_t a = (uintptr_t)(p->map + (off - p->map_off)), e = a + len;
    uintptr_t lo = outward ? a & ~(ps - 1) : (a + ps - 1) & ~(ps - 1);
    uintptr_t hi = outward ? (e + ps - 1) & ~(ps - 1) : e & ~(ps - 1);
    uintptr_t base = (uintptr_t)p->map & ~(ps - 1);
    uintptr_t top = ((uintptr_t)p->map + p->map_len + ps - 1) & ~(ps - 1);
    if (lo < base) lo = base;
    if (hi > top) hi = top;
    if (hi <= lo) return 0;
    *addr = (uint8_t *)lo;
    *n = hi - lo;
    return 1;
}

static uint64_t resident(const ec_pager *p, uint64_t off, uint64_t len) {
    uint8_t *a;
    size_t n;
    uint64_t pages = 0;
    if (!span(p, off, len, 1, &a, &n) || count_resident(a, n, &pages) != EC_OK) return 0;
    return pages * page_size();
}

/* A read stops (EC_ECANCELED) on Ctrl-C, in any thread, and in the IO thread when the pager closes: no wait
 * for a whole queued read (seconds on an SD card) stands between Ctrl-C or close and its effect. */
static int stopped(ec_pager *p) {
    return interrupted() || __atomic_load_n(&p->closing, __ATOMIC_ACQUIRE) || __atomic_load_n(&p->error, __ATOMIC_ACQUIRE);
}

/* Storage emulation: chunk starts are spaced by size / rate. Sleeps in 20 ms slices to see a stop, or the
 * throttle lifted (ec_pager_set_throttle 0). */
static double throttle_bps(ec_pager *p) {
    double bps;
    __atomic_load(&p->throttle_bps, &bps, __ATOMIC_RELAXED);
    return bps;
}

static int throttle(ec_pager *p, uint64_t n) {
    if (throttle_bps(p) <= 0) return EC_OK;
    double now = now_s();
    if (p->next_free_s < now) p->next_free_s = now; /* idle time does not bank a burst */
    while (p->next_free_s > (now = now_s()) && throttle_bps(p) > 0) {
        if (stopped(p)) return fail(EC_ECANCELED, 0, "interrupted");
        double left = p->next_free_s - now;
        sleep_s(left < 0.02 ? left : 0.02);
    }
    double bps = throttle_bps(p);
    p->next_free_s = bps > 0 ? p->next_free_s + (double)n / bps : 0;
    return EC_OK;
}

/* Read a file range into RAM through the IO path. Two ways, by prm.readahead:
 *  1 (layers large next to read_ahead_kb): fault the range into llama.cpp's mapping directly
 *    (MADV_POPULATE_READ on a MADV_NORMAL span): the kernel's read-around keeps ~read_ahead_kb of IO in
 *    flight and maps the pages without a copy. Measured here (1 GB of the F16 target, cache dropped):
 *    2.1-2.5 GB/s at 0.03 CPU-s/GB, against 0.9-2.0 GB/s at 0.2-0.9 CPU-s/GB for 8 MB preads + populate
 *    and 0.6-1.1 GB/s for plain 4 MB preads (the copy to user space is the cost on this machine).
 *  0 (exact): pread in CHUNK pieces on a POSIX_FADV_RANDOM fd (nothing past the range is read), then
 *    populate (minor faults only). Measured: POSIX_FADV_WILLNEED + populate 0.09 GB/s; readahead(2) +
 *    populate inside a 1 GB cgroup 14x slower than pread (pages read ahead are reclaimed before use).
 * Both throttle per chunk (storage emulation); compute never faults on a loaded layer. */
/* MADV_POPULATE_READ over a mapped span. *done = 1 when the pages are in; on a kernel without it
 * (EINVAL/ENOSYS) populating is turned off for good and *done stays 0: the caller preads instead. */
static int populate(ec_pager *p, uint8_t *a, size_t an, int *done) {
    *done = 0;
    if (!p->use_populate) return EC_OK;
    if (madvise(a, an, MADV_POPULATE_READ) == 0) {
        *done = 1;
        return EC_OK;
    }
    if (errno == EINVAL || errno == ENOSYS) {
        p->use_populate = 0; /* old kernel: compute takes minor faults */
        return EC_OK;
    }
    return fail(errno == EFAULT ? EC_ECHANGED : EC_EIO, errno, "madvise(MADV_POPULATE_READ)");
}

/* Bring [off, off+n) into the mapping: populate directly (readahead mode), else pread then populate. */
static int read_chunk(ec_pager *p, uint64_t off, uint64_t n) {
    uint8_t *a;
    size_t an;
    int mapped = span(p, off, n, 1, &a, &an), done = 0, rc;
    if (p->prm.readahead && mapped && (rc = populate(p, a, an, &done)) != EC_OK) return rc;
    if (done) return EC_OK;
    for (uint64_t got = 0; got < n;) {
        ssize_t r = pread(p->fd, p->scratch, (size_t)(n - got), (off_t)(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return fail(r == 0 ? EC_ECHANGED : EC_EIO, r < 0 ? errno : 0, "pread of the model file at %llu",
                                (unsigned long long)(off + got));
        got += (uint64_t)r;
    }
    return mapped ? populate(p, a, an, &done) : EC_OK;
}

/* Stops between chunks on Ctrl-C or close (EC_ECANCELED), in the caller's thread and in the IO thread. */
static int read_range(ec_pager *p, uint64_t off, uint64_t len) {
    struct stat st;
    if (fstat(p->fd, &st) != 0) return fail(EC_ESTAT, errno, "fstat of the model file");
    if ((uint64_t)st.st_size != p->file_size)
        return fail(EC_ECHANGED, 0, "the model file changed size (%llu -> %llu bytes) while in use",
                    (unsigned long long)p->file_size, (unsigned long long)st.st_size);
    if (off + len > p->file_size) return fail(EC_EINVAL, 0, "range past the end of the model file");
    int injected = __atomic_exchange_n(&p->inject, 0, __ATOMIC_ACQ_REL);
    if (injected) return fail(injected, EIO, "injected fault reading the model file at %llu", (unsigned long long)off);
    for (uint64_t done = 0; done < len; done += CHUNK) {
        uint64_t n = len - done < CHUNK ? len - done : CHUNK;
        if (stopped(p)) return fail(EC_ECANCELED, 0, "interrupted");
        int rc = throttle(p, n);
        if (!rc) rc = read_chunk(p, off + done, n);
        if (rc) return rc;
        __atomic_add_fetch(&p->st.bytes_read, n, __ATOMIC_RELAXED);
    }
    return EC_OK;
}

/* Drop a file range from RAM: page-table entries (madvise) and page cache (fadvise). */
static void evict_range(ec_pager *p, uint64_t off, uint64_t len) {
    uint8_t *a;
    size_t n;
    if (len == 0) return; /* posix_fadvise reads a length of 0 as "to the end of the file" */
    if (span(p, off, len, 0, &a, &n) && madvise(a, n, MADV_DONTNEED) != 0) warn_once(p, "madvise(MADV_DONTNEED)", errno);
    int rc = posix_fadvise(p->fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
    if (rc != 0) warn_once(p, "posix_fadvise(POSIX_FADV_DONTNEED)", rc);
}

/* The page cache holds a file in folios of up to PMD size (2 MiB with 4 KiB pages) that can straddle two
 * layers; eviction drops only folios wholly inside its range, so each evicted layer kept 0.6-3.3 MB of its
 * edges (measured on the 1.5B Q4_K_M target: ~40 MB over 25 streamed layers). A layer's eviction therefore
 * reaches up to folio_max() into a file neighbour that is streamed and not wanted (evicted, or not yet read). */
static uint64_t folio_max(void) { return (uint64_t)page_size() * (page_size() / 8); } /* PMD: a page of 8-byte entries */

static void evict_layer(ec_pager *p, int il) {
    uint64_t lo = p->layers[il].off, hi = lo + p->layers[il].len, fm = folio_max();
    int a = p->file_prev[il], b = p->file_next[il];
    pthread_mutex_lock(&p->mu);
    if (a >= 0 && !p->want[a]) {
        lo = lo - p->layers[a].off > fm ? lo - fm : p->layers[a].off;
        __atomic_store_n(&p->remeasure[a], 1, __ATOMIC_RELAXED);
    }
    if (b >= 0 && !p->want[b]) {
        uint64_t end = p->layers[b].off + p->layers[b].len;
        hi = end - hi > fm ? hi + fm : end;
        __atomic_store_n(&p->remeasure[b], 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&p->mu);
    evict_range(p, lo, hi - lo);
}

/* The pager's first error and this thread's message for it: cb_eval then aborts the graph. (mu held) */
static void record_error(ec_pager *p, int rc) {
    if (!rc || p->error) return;
    __atomic_store_n(&p->error, rc, __ATOMIC_RELEASE); /* (stopped() reads it without the mutex) */
    snprintf(p->error_text, sizeof p->error_text, "%s", ec_errbuf);
}

/* Wait until the IO thread has done every queued op. (mu held) */
static void drain(ec_pager *p) {
    while (p->completed < p->queued) pthread_cond_wait(&p->done, &p->mu);
}

static void *io_main(void *arg) {
    ec_pager *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->q_len == 0) pthread_cond_wait(&p->work, &p->mu);
        io_op op = p->q[p->q_head];
        p->q_head = (p->q_head + 1) % p->q_cap;
        p->q_len--;
        if (op.op == OP_STOP) break;
        int failed = p->error != 0;
        pthread_mutex_unlock(&p->mu);
        int rc = EC_OK;
        double t0 = now_s();
        if (failed) {
        } else if (op.op == OP_LOAD) {
            rc = read_range(p, p->layers[op.layer].off, p->layers[op.layer].len);
        } else if (op.op == OP_EVICT) {
            evict_layer(p, op.layer);
            __atomic_store_n(&p->remeasure[op.layer], 1, __ATOMIC_RELAXED);
        } else {
            for (int i = 0; i < p->n_evict; i++) evict_range(p, p->evict_pass[i].off, p->evict_pass[i].len);
        }
        double t1 = now_s();
        pthread_mutex_lock(&p->mu);
        p->st.io_busy_ns += (uint64_t)((t1 - t0) * 1e9);
        record_error(p, rc);
        p->completed++;
        pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* Streamed layers the budget plan lets be resident at once: the one computing, the read-ahead, the lag
 * (edgecad/pager.py: PagerParams.window_layers). */
static int window(const ec_pager *p) { return p->prm.depth + p->prm.lag + 1; }

static void enqueue(ec_pager *p, int op, int layer) { /* mu held */
    while (p->q_len == p->q_cap) pthread_cond_wait(&p->done, &p->mu); /* full: wait for the IO thread */
    p->q[(p->q_head + p->q_len) % p->q_cap] = (io_op){op, layer};
    p->q_len++;
    p->queued++;
    pthread_cond_signal(&p->work);
}

static void request_load(ec_pager *p, int il) { /* mu held */
    if (p->want[il]) return;
    p->want[il] = 1;
    enqueue(p, OP_LOAD, il);
    p->load_ticket[il] = p->queued;
}

static void request_evict(ec_pager *p, int il) { /* mu held */
    if (!p->want[il]) return;
    p->want[il] = 0;
    enqueue(p, OP_EVICT, il);
}

static uint64_t fixed_resident(const ec_pager *p) {
    uint64_t r = 0;
    for (int i = 0; i < p->n_pinned; i++) r += resident(p, p->pinned[i].off, p->pinned[i].len);
    for (int i = 0; i < p->n_evict; i++) r += resident(p, p->evict_pass[i].off, p->evict_pass[i].len);
    for (int il = 0; il < p->n_layers; il++)
        if (!p->streamed[il]) r += resident(p, p->layers[il].off, p->layers[il].len);
    return r;
}

static void measure(ec_pager *p, int j, int pass_start) {
    if (pass_start) p->fixed_res = fixed_resident(p);
    int lo = j - p->prm.lag - 1, hi = j + p->prm.depth + p->prm.lag; /* + lag: ec_pager_pass_end reads a whole window */
    if (hi - lo + 1 > p->n_stream || p->prm.measure > 1) { lo = 0; hi = p->n_stream - 1; }
    for (int k = lo; k <= hi; k++) {
        int il = p->ring[((k % p->n_stream) + p->n_stream) % p->n_stream];
        __atomic_store_n(&p->remeasure[il], 0, __ATOMIC_RELAXED);
        p->layer_res[il] = resident(p, p->layers[il].off, p->layers[il].len);
    }
    for (int il = 0; il < p->n_layers; il++) /* evictions that finished after their layer left the window */
        if (__atomic_exchange_n(&p->remeasure[il], 0, __ATOMIC_RELAXED))
            p->layer_res[il] = resident(p, p->layers[il].off, p->layers[il].len);
    uint64_t total = p->fixed_res;
    for (int il = 0; il < p->n_layers; il++)
        if (p->streamed[il]) total += p->layer_res[il];
    pthread_mutex_lock(&p->mu);
    p->st.resident_now = total;
    if (total > p->st.peak_resident) p->st.peak_resident = total;
    pthread_mutex_unlock(&p->mu);
}

/* Layer il is about to run: have it read, read ahead, evict the layer `lag` behind. */
static int boundary(ec_pager *p, int il) {
    int j = p->ring_pos[il];
    int pass_start = il == 0;
    pthread_mutex_lock(&p->mu);
    p->st.boundaries++;
    if (pass_start) {
        p->st.passes++;
        __atomic_store_n(&p->in_pass, 1, __ATOMIC_RELAXED);
        if (p->n_evict) enqueue(p, OP_EVICT_PASS, -1); /* the embedding rows of this pass are read already */
    }
    /* queue order: the eviction (so the window never holds more than it reserves), the layer
     * compute needs now, then the read-ahead */
    if (j >= 0 && p->n_stream >= window(p))
        request_evict(p, p->ring[(j - p->prm.lag + p->n_stream) % p->n_stream]);
    if (j >= 0) request_load(p, il);
    if (p->n_stream > 0)
        for (int k = 0, start = j >= 0 ? j + 1 : p->next_ring[il]; k < p->prm.depth; k++)
            request_load(p, p->ring[(start + k) % p->n_stream]);
    if (j >= 0) {
        double t0 = now_s();
        if (p->completed < p->load_ticket[il] && !p->error) {
            p->waiting = 1; /* the cores are free: let a gated draft run */
            pthread_cond_broadcast(&p->gate);
            while (p->completed < p->load_ticket[il] && !p->error && !interrupted())
                cond_wait_ms(&p->done, &p->mu, 20); /* wake to see a Ctrl-C (signals cannot signal a condvar) */
            p->waiting = 0;
        }
        p->st.io_wait_ns += (uint64_t)((now_s() - t0) * 1e9);
    }
    if (!p->error && interrupted()) { /* the pass stops here: its window is left half-read, and a read the IO */
        fail(EC_ECANCELED, 0, "interrupted");  /* thread is in must stop too: the pager's error until a settle */
        record_error(p, EC_ECANCELED);
    }
    int err = p->error;
    pthread_mutex_unlock(&p->mu);
    if (!err && p->prm.measure && p->n_stream > 0) measure(p, j >= 0 ? j : p->next_ring[il], pass_start);
    return err;
}

bool ec_pager_cb_eval(void *tensor, bool ask, void *user_data) {
    ec_pager *p = user_data;
    const char *name = p->name_fn(tensor);
    int is_boundary = name && strncmp(name, "attn_norm-", 10) == 0;
    if (ask) return is_boundary;
    if (!is_boundary) return true;
    int il = atoi(name + 10);
    if (il < 0 || il >= p->n_layers) return true;
    return boundary(p, il) == EC_OK; /* false aborts the graph: never touch a changed file */
}

/* Before a target pass the draft may run beside: hold the draft until the pass waits on storage. */
int ec_pager_pass_begin(ec_pager *p) {
    if (!p) return fail(EC_EINVAL, 0, "ec_pager_pass_begin: NULL pager");
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->in_pass, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&p->mu);
    return EC_OK;
}

/* After the target's pass: release a gated draft; then, while the caller drafts the next tree, evict
 * the layers the pass left in the window and read the next pass's first window (read-ahead only). */
int ec_pager_pass_end(ec_pager *p) {
    if (!p) return fail(EC_EINVAL, 0, "ec_pager_pass_end: NULL pager");
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->in_pass, 0, __ATOMIC_RELAXED);
    p->waiting = 0;
    pthread_cond_broadcast(&p->gate);
    int w = window(p);
    if (p->prm.depth > 0 && p->n_stream > w && !p->error) {
        for (int k = w; k < p->n_stream; k++) request_evict(p, p->ring[k]);
        for (int k = 0; k < w; k++) request_load(p, p->ring[k]);
    }
    int err = p->error;
    pthread_mutex_unlock(&p->mu);
    return err;
}

/* The draft's cb_eval while it drafts beside a paged target: at each draft layer boundary, hold while
 * the target computes (two models computing at once on the same cores slow both), go on while the
 * target waits for storage or between its passes. */
bool ec_pager_gate_cb_eval(void *tensor, bool ask, void *user_data) {
    ec_pager *p = user_data;
    const char *name = p->name_fn(tensor);
    int is_boundary = name && strncmp(name, "attn_norm-", 10) == 0;
    /* Split the draft's graph at its layers only while a target pass runs: serial drafting runs whole. */
    if (ask) return is_boundary && __atomic_load_n(&p->in_pass, __ATOMIC_RELAXED);
    if (!is_boundary) return true;
    pthread_mutex_lock(&p->mu);
    p->gate_users++;
    int stop = 0;
    if (p->in_pass && !p->waiting) {
        double t0 = now_s();
        while (p->in_pass && !p->waiting && !(stop = stopped(p))) cond_wait_ms(&p->gate, &p->mu, 20);
        p->st.gate_wait_ns += (uint64_t)((now_s() - t0) * 1e9);
    }
    if (p->in_pass && !stop) p->st.draft_layers_in_pass++;
    p->gate_users--;
    pthread_cond_broadcast(&p->gate); /* close may wait for the last user to leave */
    pthread_mutex_unlock(&p->mu);
    return !stop; /* Ctrl-C or close: abort the draft's graph */
}

void ec_pager_close(ec_pager *p) {
    if (!p) return;
    if (p->io_started) {
        pthread_mutex_lock(&p->mu);
        __atomic_store_n(&p->closing, 1, __ATOMIC_RELEASE); /* a read in flight stops at its next chunk */
        p->completed += (uint64_t)p->q_len; /* drop pending work */
        p->q_len = 0;
        enqueue(p, OP_STOP, -1);
        while (p->gate_users) { /* a draft held by the gate sees `closing` and leaves */
            pthread_cond_broadcast(&p->gate);
            cond_wait_ms(&p->gate, &p->mu, 20);
        }
        pthread_mutex_unlock(&p->mu);
        pthread_join(p->io, NULL);
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->work);
        pthread_cond_destroy(&p->done);
        pthread_cond_destroy(&p->gate);
    }
    if (p->fd >= 0) close(p->fd);
    free(p->layers); free(p->streamed); free(p->ring); free(p->ring_pos); free(p->next_ring);
    free(p->file_prev); free(p->file_next);
    free(p->pinned); free(p->evict_pass); free(p->q); free(p->want); free(p->load_ticket);
    free(p->scratch); free(p->layer_res); free(p->remeasure);
    free(p);
}

static void *dup_array(const void *src, size_t n, size_t size) {
    void *d = calloc(n ? n : 1, size);
    if (d && n) memcpy(d, src, n * size);
    return d;
}

int ec_pager_open(const char *path, uint64_t map_addr, uint64_t map_offset, uint64_t map_len,
                  const ec_range *layers, const uint8_t *streamed, int n_layers,
                  const ec_range *pinned, int n_pinned, const ec_range *evict_each_pass, int n_evict,
                  const ec_pager_params *params, void *name_fn, ec_pager **out) {
    if (!path || !map_addr || !layers || !streamed || n_layers <= 0 || !params || !name_fn || !out ||
        params->depth < 0 || params->lag < 1)
        return fail(EC_EINVAL, 0, "ec_pager_open: bad argument%s",
                    params && params->lag < 1 ? " (lag must be >= 1: lag 0 evicts the layer about to run)" : "");
    *out = NULL;
    ec_pager *p = calloc(1, sizeof *p);
    if (!p) return fail(EC_ENOMEM, errno, "calloc(ec_pager)");
    p->fd = -1;
    p->map = (uint8_t *)(uintptr_t)map_addr;
    p->map_off = map_offset;
    p->map_len = map_len;
    p->n_layers = n_layers;
    p->prm = *params;
    if (p->prm.depth > n_layers) p->prm.depth = n_layers; /* a window never holds more than every layer */
    if (p->prm.lag > n_layers) p->prm.lag = n_layers;
    p->throttle_bps = p->prm.throttle_bps;
    p->name_fn = (const char *(*)(const void *))name_fn;
    p->use_populate = 1;
    p->n_pinned = n_pinned;
    p->n_evict = n_evict;
    p->q_cap = 4 * n_layers + 16;
    p->layers = dup_array(layers, n_layers, sizeof *layers);
    p->streamed = dup_array(streamed, n_layers, 1);
    p->pinned = dup_array(pinned, n_pinned, sizeof *pinned);
    p->evict_pass = dup_array(evict_each_pass, n_evict, sizeof *evict_each_pass);
    p->ring = calloc(n_layers, sizeof *p->ring);
    p->ring_pos = calloc(n_layers, sizeof *p->ring_pos);
    p->next_ring = calloc(n_layers, sizeof *p->next_ring);
    p->file_prev = calloc(n_layers, sizeof *p->file_prev);
    p->file_next = calloc(n_layers, sizeof *p->file_next);
    p->q = calloc(p->q_cap, sizeof *p->q);
    p->want = calloc(n_layers, 1);
    p->load_ticket = calloc(n_layers, sizeof *p->load_ticket);
    p->layer_res = calloc(n_layers, sizeof *p->layer_res);
    p->remeasure = calloc(n_layers, 1);
    p->scratch = malloc(CHUNK);
    if (!p->layers || !p->streamed || !p->pinned || !p->evict_pass || !p->ring || !p->ring_pos || !p->next_ring || !p->file_prev || !p->file_next ||
        !p->q || !p->want || !p->load_ticket || !p->layer_res || !p->remeasure || !p->scratch) {
        ec_pager_close(p);
        return fail(EC_ENOMEM, ENOMEM, "allocating the pager");
    }
    for (int il = 0; il < n_layers; il++) {
        p->ring_pos[il] = -1;
        if (p->streamed[il]) { p->ring_pos[il] = p->n_stream; p->ring[p->n_stream++] = il; }
        else p->want[il] = 1; /* pinned: always wanted, never queued */
    }
    for (int il = 0; il < n_layers; il++) p->file_prev[il] = p->file_next[il] = -1;
    for (int il = 0; il < n_layers; il++) /* streamed file neighbours: less than a page apart, nothing between */
        for (int k = 0; k < n_layers; k++) {
            uint64_t end = p->layers[k].off + p->layers[k].len, start = p->layers[il].off;
            if (k == il || !p->streamed[k] || !p->streamed[il] || !p->layers[k].len || end > start ||
                start - end >= page_size())
                continue;
            int between = 0;
            for (int i = 0; i < n_pinned; i++) between |= pinned[i].off < start && pinned[i].off + pinned[i].len > end;
            for (int i = 0; i < n_evict; i++)
                between |= evict_each_pass[i].off < start && evict_each_pass[i].off + evict_each_pass[i].len > end;
            if (!between) { p->file_prev[il] = k; p->file_next[k] = il; }
        }
    for (int il = n_layers - 1, next = 0; il >= 0; il--) { /* first streamed layer after il, wrapping */
        p->next_ring[il] = next % (p->n_stream ? p->n_stream : 1);
        if (p->streamed[il]) next = p->ring_pos[il];
    }
    p->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (p->fd < 0) {
        int rc = fail(EC_EOPEN, errno, "open(%s)", path);
        ec_pager_close(p);
        return rc;
    }
    struct stat st;
    if (fstat(p->fd, &st) != 0) {
        int rc = fail(EC_ESTAT, errno, "fstat(%s)", path);
        ec_pager_close(p);
        return rc;
    }
    p->file_size = (uint64_t)st.st_size;
    int prc = pthread_mutex_init(&p->mu, NULL);
    if (!prc) prc = cond_init(&p->work);
    if (!prc) prc = cond_init(&p->done);
    if (!prc) prc = cond_init(&p->gate);
    if (prc) {
        ec_pager_close(p);
        return fail(EC_ETHREAD, prc, "initialising the pager's mutex and condition variables");
    }
    /* Exact mode (layers small next to read_ahead_kb: read-around would pull in far more than the budget):
     * no readahead on the pager's fd nor on faults in llama.cpp's mapping. Readahead mode: the kernel's
     * read-around (up to read_ahead_kb around each fault, reserved by the budget plan) keeps the device
     * busy; see read_range for the measurements. */
    if (!p->prm.readahead) {
        int arc = posix_fadvise(p->fd, 0, 0, POSIX_FADV_RANDOM);
        if (arc != 0) warn_once(p, "posix_fadvise(POSIX_FADV_RANDOM)", arc);
    }
    /* The mapping: read-around (MADV_NORMAL) where the pager reads by populating (readahead mode), none
     * (MADV_RANDOM) where compute itself faults: token-embedding rows, and everything in exact mode. */
    uint8_t *ma;
    size_t mn;
    if (span(p, p->map_off, p->map_len, 1, &ma, &mn) &&
        madvise(ma, mn, p->prm.readahead ? MADV_NORMAL : MADV_RANDOM) != 0)
        warn_once(p, "madvise(MADV_NORMAL / MADV_RANDOM)", errno);
    for (int i = 0; p->prm.readahead && i < p->n_evict; i++)
        if (span(p, p->evict_pass[i].off, p->evict_pass[i].len, 1, &ma, &mn) && madvise(ma, mn, MADV_RANDOM) != 0)
            warn_once(p, "madvise(MADV_RANDOM)", errno);
    int rc = pthread_create(&p->io, NULL, io_main, p);
    if (rc != 0) {
        ec_pager_close(p);
        return fail(EC_ETHREAD, rc, "pthread_create(IO thread)");
    }
    p->io_started = 1;
    *out = p;
    return EC_OK;
}

int ec_pager_settle(ec_pager *p) {
    if (!p) return fail(EC_EINVAL, 0, "ec_pager_settle: NULL pager");
    pthread_mutex_lock(&p->mu);
    drain(p); /* no IO in flight */
    __atomic_store_n(&p->error, 0, __ATOMIC_RELEASE); /* settle is also the recovery after an IO error or a
                                                        Ctrl-C: back to the state after load */
    for (int il = 0; il < p->n_layers; il++)
        if (p->streamed[il]) p->want[il] = 0;
    pthread_mutex_unlock(&p->mu);
    int rc = EC_OK;
    for (int i = 0; i < p->n_pinned && !rc; i++) rc = read_range(p, p->pinned[i].off, p->pinned[i].len);
    for (int il = 0; il < p->n_layers && !rc; il++)
        if (!p->streamed[il]) rc = read_range(p, p->layers[il].off, p->layers[il].len);
    char why[sizeof ec_errbuf]; /* the failure's message, before the evictions below can overwrite it */
    snprintf(why, sizeof why, "%s", rc ? ec_errbuf : "");
    /* then drop the rest: what a whole-file load read, and what the kernel read ahead past the pinned ranges */
    for (int il = 0; il < p->n_layers; il++)
        if (p->streamed[il]) evict_range(p, p->layers[il].off, p->layers[il].len);
    for (int i = 0; i < p->n_evict; i++) evict_range(p, p->evict_pass[i].off, p->evict_pass[i].len);
    p->fixed_res = fixed_resident(p);
    for (int il = 0; il < p->n_layers; il++)
        p->layer_res[il] = p->streamed[il] ? resident(p, p->layers[il].off, p->layers[il].len) : 0;
    if (rc) { /* a failed settle (EIO, Ctrl-C) is the pager's error until a settle succeeds: recover again */
        snprintf(ec_errbuf, sizeof ec_errbuf, "%s", why);
        pthread_mutex_lock(&p->mu);
        record_error(p, rc);
        pthread_mutex_unlock(&p->mu);
    }
    if (!rc && p->prm.depth > 0) { /* start reading the first pass's window (what the plan reserves) */
        pthread_mutex_lock(&p->mu);
        for (int k = 0; k < window(p) && k < p->n_stream; k++) request_load(p, p->ring[k]);
        pthread_mutex_unlock(&p->mu);
    }
    return rc;
}

int ec_pager_get_stats(ec_pager *p, ec_pager_stats *out) {
    if (!p || !out) return fail(EC_EINVAL, 0, "ec_pager_get_stats: NULL argument");
    pthread_mutex_lock(&p->mu);
    *out = p->st;
    out->bytes_read = __atomic_load_n(&p->st.bytes_read, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&p->mu);
    return EC_OK;
}

void ec_pager_reset_peak(ec_pager *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->st.peak_resident = p->st.resident_now;
    pthread_mutex_unlock(&p->mu);
}

int ec_pager_inject_fault(ec_pager *p, int code) {
    if (!p) return fail(EC_EINVAL, 0, "ec_pager_inject_fault: NULL pager");
    pthread_mutex_lock(&p->mu);
    drain(p); /* the next read is the caller's */
    __atomic_store_n(&p->inject, code, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->mu);
    return EC_OK;
}

int ec_pager_set_throttle(ec_pager *p, double bytes_per_second) {
    if (!p || !(bytes_per_second >= 0)) return fail(EC_EINVAL, 0, "ec_pager_set_throttle: bad argument");
    __atomic_store(&p->throttle_bps, &bytes_per_second, __ATOMIC_RELAXED);
    return EC_OK;
}

int ec_pager_error(ec_pager *p) {
    if (!p) return EC_EINVAL;
    pthread_mutex_lock(&p->mu);
    int e = p->error;
    if (e) snprintf(ec_errbuf, sizeof ec_errbuf, "%s", p->error_text); /* for ec_last_error() in this thread */
    pthread_mutex_unlock(&p->mu);
    return e;
}

/* ------------------------------------------------------------------------ */
/* 4. bandwidth                                                             */
/* ------------------------------------------------------------------------ */

/* The storage's sequential read speed, measured the way the pager reads in readahead mode: the range
 * is dropped from the page cache, mapped, and faulted in with MADV_POPULATE_READ in CHUNK pieces (the
 * kernel's read-around, no copy to user space); where populate is unavailable, 4 MB preads. */
int ec_read_bandwidth(const char *path, uint64_t offset, uint64_t len, double *bytes_per_second) {
    if (!path || !bytes_per_second) return fail(EC_EINVAL, 0, "ec_read_bandwidth: NULL argument");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(EC_EOPEN, errno, "open(%s)", path);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return fail(EC_ESTAT, err, "fstat(%s)", path);
    }
    if (offset >= (uint64_t)st.st_size) len = 0;
    else if (len > (uint64_t)st.st_size - offset) len = (uint64_t)st.st_size - offset;
    int rc = posix_fadvise(fd, (off_t)offset, (off_t)len, POSIX_FADV_DONTNEED);
    if (rc != 0) fprintf(stderr, "edgecad: warning: posix_fadvise(DONTNEED) failed: %s\n", strerror(rc));
    uint64_t aligned = offset & ~(uint64_t)(page_size() - 1);
    size_t maplen = (size_t)(len + (offset - aligned));
    uint8_t *map = len ? mmap(NULL, maplen, PROT_READ, MAP_SHARED, fd, (off_t)aligned) : MAP_FAILED;
    uint8_t *buf = NULL;
    double t0 = now_s(), dt = 0;
    uint64_t got = 0;
    int populate = map != MAP_FAILED;
    /* Each chunk is dropped once read (untimed): the calibration must never hold more than a chunk of the
     * model resident (a 256 MB sample mapped whole would overrun the engine's budget on a small device). */
    while (got < maplen && populate) {
        size_t n = maplen - got < CHUNK ? (size_t)(maplen - got) : (size_t)CHUNK;
        double c0 = now_s();
        int ok = madvise(map + got, n, MADV_POPULATE_READ) == 0;
        dt += now_s() - c0;
        if (ok) {
            madvise(map + got, n, MADV_DONTNEED);
            posix_fadvise(fd, (off_t)(aligned + got), (off_t)n, POSIX_FADV_DONTNEED);
        }
        if (!ok) {
            if (errno != EINVAL && errno != ENOSYS) {
                int err = errno;
                munmap(map, maplen);
                close(fd);
                return fail(EC_EIO, err, "madvise(MADV_POPULATE_READ) of %s", path);
            }
            populate = 0; /* old kernel: time preads instead, from the start */
            posix_fadvise(fd, (off_t)offset, (off_t)len, POSIX_FADV_DONTNEED);
            got = 0;
            break;
        }
        got += n;
    }
    if (!populate) {
        t0 = now_s();
        size_t bufsz = 4u << 20;
        if (!(buf = malloc(bufsz))) {
            if (map != MAP_FAILED) munmap(map, maplen);
            close(fd);
            return fail(EC_ENOMEM, errno, "malloc(%zu)", bufsz);
        }
        while (got < len) {
            size_t want = len - got < bufsz ? (size_t)(len - got) : bufsz;
            ssize_t r = pread(fd, buf, want, (off_t)(offset + got));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) {
                int err = errno;
                free(buf);
                if (map != MAP_FAILED) munmap(map, maplen);
                close(fd);
                return fail(EC_EIO, err, "pread(%s)", path);
            }
            if (r == 0) break;
            double c1 = now_s(); /* dropped once read, untimed: the page cache must not hold the sample */
            posix_fadvise(fd, (off_t)(offset + got), (off_t)r, POSIX_FADV_DONTNEED);
            t0 += now_s() - c1;
            got += (uint64_t)r;
        }
        dt = now_s() - t0;
    }
    if (map != MAP_FAILED) munmap(map, maplen);
    posix_fadvise(fd, (off_t)offset, (off_t)len, POSIX_FADV_DONTNEED);
    free(buf);
    close(fd);
    *bytes_per_second = dt > 0 ? (double)(populate ? len : got) / dt : 0.0;
    return EC_OK;
}

/* ------------------------------------------------------------------------ */
/* 5. load guard                                                            */
/* ------------------------------------------------------------------------ */

/* llama.cpp maps a model with MAP_POPULATE and advises POSIX_MADV_WILLNEED over the whole file
 * (src/llama-mmap.cpp; hard-coded on, no parameter turns it off), so a paged target would be read whole
 * at load and then evicted. While a guard is on, libllama's calls to mmap / mmap64 / posix_madvise go
 * through hooks (its import slots, patched here and restored by ec_load_guard_end) that drop MAP_POPULATE
 * and the WILLNEED advice for the guarded file only; every other call passes through unchanged. The
 * pager then reads what the plan keeps. One guard at a time (the Python side holds a lock). */

#ifdef __linux__

typedef struct {
    void **slot;  /* the import slot (GOT entry) in libllama */
    void *saved;  /* its value before the patch */
    int relro;    /* 1 = the slot lies in a read-only (RELRO) page: unprotect to write */
} plt_patch;

static struct {
    int on;                   /* hooks act (set before patching, cleared after restoring) */
    dev_t dev;                /* identity of the guarded file */
    ino_t ino;
    uintptr_t lo, hi;         /* its mapping made under the guard ([lo, hi) in memory) */
    ec_load_guard_stats st;
    plt_patch patch[16];      /* [n_patch] slots patched */
    int n_patch;
} guard;

static int guarded_fd(int fd) {
    struct stat st;
    return fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == guard.dev && st.st_ino == guard.ino;
}

static void note_mapping(void *r, size_t len, int fd) {
    if (r == MAP_FAILED || !guarded_fd(fd)) return;
    guard.lo = (uintptr_t)r;
    guard.hi = (uintptr_t)r + len;
    guard.st.mapped_bytes += len;
}

/* The flags to map with: MAP_POPULATE dropped for the guarded file. */
static int guard_flags(int flags, int fd) {
    if (!__atomic_load_n(&guard.on, __ATOMIC_ACQUIRE) || !(flags & MAP_POPULATE) || !guarded_fd(fd)) return flags;
    guard.st.populate_dropped++;
    return flags & ~MAP_POPULATE;
}

static void *hook_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    void *r = mmap(addr, len, prot, guard_flags(flags, fd), fd, off);
    if (__atomic_load_n(&guard.on, __ATOMIC_ACQUIRE)) note_mapping(r, len, fd);
    return r;
}

static void *hook_mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    void *r = mmap64(addr, len, prot, guard_flags(flags, fd), fd, off);
    if (__atomic_load_n(&guard.on, __ATOMIC_ACQUIRE)) note_mapping(r, len, fd);
    return r;
}

static int hook_posix_madvise(void *addr, size_t len, int advice) {
    uintptr_t a = (uintptr_t)addr;
    if (__atomic_load_n(&guard.on, __ATOMIC_ACQUIRE) && advice == POSIX_MADV_WILLNEED && a >= guard.lo &&
        a + len <= guard.hi) {
        guard.st.willneed_dropped += len;
        return 0;
    }
    return posix_madvise(addr, len, advice);
}

static const struct {
    const char *name;
    void *hook;
} hooks[] = {{"mmap", (void *)hook_mmap}, {"mmap64", (void *)hook_mmap64}, {"posix_madvise", (void *)hook_posix_madvise}};

#if UINTPTR_MAX > 0xffffffffu
#define R_SYM(info) ELF64_R_SYM(info)
#else
#define R_SYM(info) ELF32_R_SYM(info)
#endif

typedef struct {
    const char *lib;          /* the file name to find (a substring of the loaded object's path) */
    int found;                /* objects whose path contains lib */
    char path[256];           /* the first one's path */
} find_ctx;

/* Record the slots of one relocation table whose symbol is hooked. */
static void scan_relocs(uintptr_t base, const void *tab, size_t size, int rela, const ElfW(Sym) *sym,
                        const char *str, const ElfW(Phdr) *relro) {
    size_t ent = rela ? sizeof(ElfW(Rela)) : sizeof(ElfW(Rel));
    for (size_t i = 0; i < size / ent; i++) {
        const ElfW(Rel) *r = (const ElfW(Rel) *)((const char *)tab + i * ent); /* Rela begins like Rel */
        const char *name = str + sym[R_SYM(r->r_info)].st_name;
        for (size_t h = 0; h < sizeof hooks / sizeof hooks[0]; h++) {
            if (strcmp(name, hooks[h].name) != 0 || guard.n_patch == (int)(sizeof guard.patch / sizeof guard.patch[0]))
                continue;
            plt_patch *pp = &guard.patch[guard.n_patch++];
            pp->slot = (void **)(base + r->r_offset);
            pp->saved = (void *)hooks[h].hook; /* the hook to write; swapped with the old value when patched */
            /* the loader write-protects RELRO's whole pages only: [align_down(start), align_down(end)) */
            uintptr_t ps = page_size(), slot = base + r->r_offset;
            pp->relro = relro && slot >= ((base + relro->p_vaddr) & ~(ps - 1)) &&
                        slot < ((base + relro->p_vaddr + relro->p_memsz) & ~(ps - 1));
        }
    }
}

static int find_slots(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    find_ctx *fc = data;
    if (!info->dlpi_name || !strstr(info->dlpi_name, fc->lib)) return 0;
    if (fc->found++) return 0;
    snprintf(fc->path, sizeof fc->path, "%s", info->dlpi_name);
    uintptr_t base = info->dlpi_addr;
    const ElfW(Dyn) *dyn = NULL;
    const ElfW(Phdr) *relro = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC) dyn = (const ElfW(Dyn) *)(base + info->dlpi_phdr[i].p_vaddr);
        if (info->dlpi_phdr[i].p_type == PT_GNU_RELRO) relro = &info->dlpi_phdr[i];
    }
    if (!dyn) return 0;
    uintptr_t symtab = 0, strtab = 0, jmprel = 0, rela = 0, rel = 0;
    size_t pltrelsz = 0, relasz = 0, relsz = 0;
    int pltrel = 0;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = dyn->d_un.d_ptr; break;
        case DT_STRTAB: strtab = dyn->d_un.d_ptr; break;
        case DT_JMPREL: jmprel = dyn->d_un.d_ptr; break;
        case DT_PLTRELSZ: pltrelsz = dyn->d_un.d_val; break;
        case DT_PLTREL: pltrel = (int)dyn->d_un.d_val; break;
        case DT_RELA: rela = dyn->d_un.d_ptr; break;
        case DT_RELASZ: relasz = dyn->d_un.d_val; break;
        case DT_REL: rel = dyn->d_un.d_ptr; break;
        case DT_RELSZ: relsz = dyn->d_un.d_val; break;
        }
    }
    /* glibc relocates these in place to addresses; other loaders (bionic, musl) leave offsets. */
#define AT(v) ((v) < base ? (v) + base : (v))
    if (!symtab || !strtab) return 0;
    const ElfW(Sym) *sym = (const ElfW(Sym) *)AT(symtab);
    const char *str = (const char *)AT(strtab);
    if (jmprel) scan_relocs(base, (const void *)AT(jmprel), pltrelsz, pltrel == DT_RELA, sym, str, relro);
    if (rela) scan_relocs(base, (const void *)AT(rela), relasz, 1, sym, str, relro); /* GLOB_DAT: -fno-plt */
    if (rel) scan_relocs(base, (const void *)AT(rel), relsz, 0, sym, str, relro);
#undef AT
    return 0;
}

/* Write v into a slot; a RELRO slot is made writable for the write and read-only again. */
static int write_slot(plt_patch *pp, void *v) {
    uintptr_t page = (uintptr_t)pp->slot & ~(uintptr_t)(page_size() - 1);
    if (pp->relro && mprotect((void *)page, page_size(), PROT_READ | PROT_WRITE) != 0)
        return fail(EC_EUNSUPPORTED, errno, "mprotect of libllama's import slot");
    __atomic_store_n(pp->slot, v, __ATOMIC_SEQ_CST);
    if (pp->relro && mprotect((void *)page, page_size(), PROT_READ) != 0)
        return fail(EC_EUNSUPPORTED, errno, "mprotect of libllama's import slot");
    return EC_OK;
}

int ec_load_guard_begin(const char *path, const char *lib_name) {
    if (!path || !lib_name) return fail(EC_EINVAL, 0, "ec_load_guard_begin: NULL argument");
    if (guard.n_patch) return fail(EC_EINVAL, 0, "ec_load_guard_begin: a guard is already on");
    struct stat st;
    if (stat(path, &st) != 0) return fail(EC_ESTAT, errno, "stat(%s)", path);
    memset(&guard, 0, sizeof guard);
    guard.dev = st.st_dev;
    guard.ino = st.st_ino;
    find_ctx fc = {lib_name, 0, ""};
    dl_iterate_phdr(find_slots, &fc);
    if (fc.found != 1) {
        guard.n_patch = 0;
        return fail(EC_EUNSUPPORTED, 0, "%d loaded objects named like %s (need exactly one)", fc.found, lib_name);
    }
    int maps = 0;
    for (int i = 0; i < guard.n_patch; i++) maps += guard.patch[i].saved != (void *)hook_posix_madvise;
    if (!maps) {
        guard.n_patch = 0;
        return fail(EC_EUNSUPPORTED, 0, "%s does not import mmap through a patchable slot", fc.path);
    }
    __atomic_store_n(&guard.on, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < guard.n_patch; i++) {
        void *hook = guard.patch[i].saved;
        guard.patch[i].saved = __atomic_load_n(guard.patch[i].slot, __ATOMIC_SEQ_CST);
        int rc = write_slot(&guard.patch[i], hook);
        if (rc) {
            guard.n_patch = i; /* restore those already patched */
            ec_load_guard_end(NULL);
            return rc;
        }
    }
    guard.st.slots = guard.n_patch;
    return EC_OK;
}

int ec_load_guard_end(ec_load_guard_stats *out) {
    int rc = EC_OK;
    for (int i = guard.n_patch - 1; i >= 0; i--) {
        int r = write_slot(&guard.patch[i], guard.patch[i].saved);
        if (r && !rc) rc = r;
    }
    __atomic_store_n(&guard.on, 0, __ATOMIC_RELEASE);
    if (out) *out = guard.st;
    guard.n_patch = 0;
    return rc;
}

#else /* no ELF import slots to patch: loads read what llama.cpp reads */

int ec_load_guard_begin(const char *path, const char *lib_name) {
    (void)path, (void)lib_name;
    return fail(EC_EUNSUPPORTED, 0, "the load guard needs Linux");
}

int ec_load_guard_end(ec_load_guard_stats *out) {
    if (out) memset(out, 0, sizeof *out);
    return EC_OK;
}

#endif

/* ------------------------------------------------------------------------ */
/* 6. interrupt                                                             */
/* ------------------------------------------------------------------------ */

/* Python sees Ctrl-C only between bytecodes: while a llama_decode waits on storage for seconds (an SD
 * card), or the pinned layers are read, it would not stop. A SIGINT handler chained in front of Python's
 * sets ec_interrupted_flag, which the waits above and llama.cpp's abort callback read; then Python's own
 * handler runs as before and raises KeyboardInterrupt once the call returns. */

static struct sigaction prev_sigint;

static void on_sigint(int sig, siginfo_t *info, void *uc) {
    __atomic_store_n(&ec_interrupted_flag, 1, __ATOMIC_RELEASE);
    /* SIG_DFL and SIG_IGN are values of the handler whatever the flags say (SA_SIGINFO may be set with them):
     * test them first, call a function only when there is one */
    if (prev_sigint.sa_handler == SIG_DFL) {
        sigaction(sig, &prev_sigint, NULL); /* no handler before us: die of SIGINT as before */
        raise(sig);
    } else if (prev_sigint.sa_handler == SIG_IGN) {
    } else if (prev_sigint.sa_flags & SA_SIGINFO) {
        prev_sigint.sa_sigaction(sig, info, uc);
    } else {
        prev_sigint.sa_handler(sig);
    }
}

int ec_interrupt_install(void) {
    struct sigaction cur;
    if (sigaction(SIGINT, NULL, &cur) != 0) return fail(EC_EINVAL, errno, "sigaction(SIGINT)");
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigint) return EC_OK; /* installed already */
    if (cur.sa_handler == SIG_IGN) return EC_OK;  /* Ctrl-C is ignored (with or without SA_SIGINFO) */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigint;
    sa.sa_flags = SA_SIGINFO | (cur.sa_flags & (SA_RESTART | SA_ONSTACK));
    sigemptyset(&sa.sa_mask);
    prev_sigint = cur;
    if (sigaction(SIGINT, &sa, NULL) != 0) return fail(EC_EINVAL, errno, "sigaction(SIGINT)");
    return EC_OK;
}

void ec_interrupt_clear(void) { __atomic_store_n(&ec_interrupted_flag, 0, __ATOMIC_RELEASE); }

int ec_interrupt_pending(void) { return interrupted(); }

bool ec_abort_callback(void *data) {
    (void)data;
    return interrupted() != 0;
}

/* ------------------------------------------------------------------------ */
/* 7. log                                                                   */
/* ------------------------------------------------------------------------ */

/* llama.cpp calls its log callback from inside its own calls. A Python callback there is where a Ctrl-C
 * lands and is lost ("Exception ignored on calling ctypes callback function"), so the callback is C: it
 * prints when verbose and keeps the last error lines for exception messages. */

#define LOG_KEEP 8
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static char log_lines[LOG_KEEP][256]; /* ring of the last error lines */
static int log_n, log_next;
static int log_verbose;
static int log_last_level; /* level of the previous message: GGML_LOG_LEVEL_CONT continues it */

enum { LOG_WARN = 3, LOG_ERROR = 4, LOG_CONT = 5 }; /* ggml/include/ggml.h: enum ggml_log_level */

void ec_log_callback(int level, const char *text, void *user_data) {
    (void)user_data;
    if (!text) return;
    if (__atomic_load_n(&log_verbose, __ATOMIC_RELAXED)) fputs(text, stderr);
    if (level == LOG_CONT) level = __atomic_load_n(&log_last_level, __ATOMIC_RELAXED);
    __atomic_store_n(&log_last_level, level, __ATOMIC_RELAXED);
    if (level != LOG_ERROR) return; /* the reason a call failed; warnings are not it */
    while (*text == ' ' || *text == '\n') text++;
    size_t n = strlen(text);
    while (n && (text[n - 1] == '\n' || text[n - 1] == ' ')) n--;
    if (!n) return;
    pthread_mutex_lock(&log_mu);
    snprintf(log_lines[log_next], sizeof log_lines[0], "%.*s", (int)n, text);
    log_next = (log_next + 1) % LOG_KEEP;
    if (log_n < LOG_KEEP) log_n++;
    pthread_mutex_unlock(&log_mu);
}

void ec_log_set_verbose(int verbose) { __atomic_store_n(&log_verbose, verbose, __ATOMIC_RELAXED); }

int ec_log_take_errors(char *out, size_t cap, int last) {
    if (!out || !cap) return fail(EC_EINVAL, 0, "ec_log_take_errors: no buffer");
    out[0] = 0;
    pthread_mutex_lock(&log_mu);
    int k = last < log_n ? last : log_n;
    for (int i = 0; i < k; i++) {
        const char *line = log_lines[(log_next - k + i + LOG_KEEP) % LOG_KEEP];
        size_t used = strlen(out);
        snprintf(out + used, cap - used, "%s%s", i ? " | " : "", line);
    }
    log_n = 0;
    pthread_mutex_unlock(&log_mu);
    return EC_OK;
}

