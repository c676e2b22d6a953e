/*
 * edgecad native library: what every part shares, and the small parts.
 *
 * Small, dependency-free C called from Python through ctypes (every binding in edgecad/native.py). Every
 * function returns an EC_* status code (0 = success); on failure ec_last_error() gives a message for the
 * calling thread, naming the syscall and errno text.
 *
 * Files:
 *   common.c   1. errors      status codes and the per-thread error message; shared helpers
 *              2. residency   how many bytes of a memory or file range are in RAM (mincore)
 *              4. bandwidth   sequential read speed of a file after dropping it from the page cache
 *              6. interrupt   Ctrl-C reaches C code that waits (a pass waiting on storage, the pinned reads)
 *              7. log         llama.cpp's log callback, in C: Python run inside a llama.cpp call would lose a Ctrl-C
 *   pager.c    3. pager       stream a model's layers through a memory budget: an IO thread that reads
 *                             ahead and evicts, driven by llama.cpp's cb_eval at every layer boundary
 *   guard.c    5. load guard  llama.cpp's load of a paged model maps it without reading it all (PLT hooks)
 */
#include "internal.h"

/* ------------------------------------------------------------------------ */
/* 1. errors                                                                */
/* ------------------------------------------------------------------------ */

__thread char ec_errbuf[EC_ERRBUF];

const char *ec_last_error(void) { return ec_errbuf; }

int ec_version(void) { return EC_VERSION; }

const char *ec_status_name(int code) {
    static const char *names[] = {"EC_OK", "EC_EINVAL", "EC_EOPEN", "EC_ESTAT", "EC_EMMAP", "EC_EMINCORE",
                                  "EC_ENOMEM", "EC_ETHREAD", "EC_ECHANGED", "EC_EIO", "EC_EUNSUPPORTED",
                                  "EC_ECANCELED"};
    return code >= 0 && code < (int)(sizeof names / sizeof names[0]) ? names[code] : NULL;
}

/* Record "what: strerror(errno)" (or just "what" when err == 0) and return code. */
int fail(int code, int err, const char *fmt, ...) {
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

size_t page_size(void) { /* any thread may ask first: the cache is an atomic */
    static size_t ps;
    size_t v = __atomic_load_n(&ps, __ATOMIC_RELAXED);
    if (!v) __atomic_store_n(&ps, v = (size_t)sysconf(_SC_PAGESIZE), __ATOMIC_RELAXED);
    return v;
}

/* Condition variables whose timed waits use CLOCK_MONOTONIC: a clock step (a Pi without an RTC syncing its
 * time) must not stretch or shorten a wait. Returns 0 or the pthread error. */
#ifdef __APPLE__
#define COND_CLOCK CLOCK_REALTIME /* macOS has no pthread_condattr_setclock: its timed waits use the wall clock */
#else
#define COND_CLOCK CLOCK_MONOTONIC
#endif

int cond_init(pthread_cond_t *c) {
    pthread_condattr_t a;
    int rc = pthread_condattr_init(&a);
#ifndef __APPLE__
    if (!rc) rc = pthread_condattr_setclock(&a, COND_CLOCK);
#endif
    if (!rc) rc = pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
    return rc;
}

/* Wait on c for at most ms milliseconds (mu held): callers loop on their condition and on Ctrl-C. */
void cond_wait_ms(pthread_cond_t *c, pthread_mutex_t *mu, long ms) {
    struct timespec ts;
    clock_gettime(COND_CLOCK, &ts);
    ts.tv_sec += ms / 1000, ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    pthread_cond_timedwait(c, mu, &ts);
}

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int open_file(const char *path, int *fd, uint64_t *size) {
    *fd = open(path, O_RDONLY | O_CLOEXEC);
    if (*fd < 0) return fail(EC_EOPEN, errno, "open(%s)", path);
    struct stat st;
    if (fstat(*fd, &st) != 0) {
        int err = errno;
        close(*fd);
        *fd = -1;
        return fail(EC_ESTAT, err, "fstat(%s)", path);
    }
    *size = (uint64_t)st.st_size;
    return EC_OK;
}

/* ------------------------------------------------------------------------ */
/* 2. residency                                                             */
/* ------------------------------------------------------------------------ */

/* Count resident pages of the page-aligned span covering [addr, addr+len). */
int count_resident(const void *addr, uint64_t len, uint64_t *pages_out) {
    size_t ps = page_size();
    uintptr_t start = (uintptr_t)addr & ~(uintptr_t)(ps - 1);
    uintptr_t end = ((uintptr_t)addr + len + ps - 1) & ~(uintptr_t)(ps - 1);
    size_t npages = (end - start) / ps;
    unsigned char stackvec[4096];
    unsigned char *vec = npages <= sizeof stackvec ? stackvec : malloc(npages);
    if (!vec) return fail(EC_ENOMEM, errno, "malloc(%zu) for mincore", npages);
    if (mincore((void *)start, end - start, (void *)vec) != 0) { /* (vec: unsigned char * on Linux, char * on macOS) */
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

/* open(path) and clip [offset, offset + *len) to the file (*len 0 at or past its end); *aligned is the first
 * file offset of the page-aligned span that covers it. EC_EOPEN / EC_ESTAT as open_file. The span is mapped a
 * piece at a time (map_piece), never whole: a span of 4 GiB or more does not fit a 32-bit size_t, and a 32-bit
 * process has no room for a mapping of a few GiB anyway (whole model files are asked about). */
static int open_span(const char *path, uint64_t offset, uint64_t *len, int *fd, uint64_t *aligned) {
    uint64_t size;
    int rc = open_file(path, fd, &size);
    if (rc) return rc;
    if (offset >= size) *len = 0;
    else if (*len > size - offset) *len = size - offset;
    *aligned = offset & ~(uint64_t)(page_size() - 1);
    return EC_OK;
}

/* Bytes mapped at a time: mincore's vector for a piece fits count_resident's stack buffer (4096 pages). */
static uint64_t piece_bytes(void) { return (uint64_t)4096 * page_size(); }

/* Map the n bytes of fd at file offset `at` (page-aligned; n small enough for size_t: a piece), shared and
 * read-only. A fresh shared mapping faults nothing in. EC_EMMAP with the message on failure. */
static int map_piece(int fd, const char *path, uint64_t at, uint64_t n, uint8_t **out) {
    void *p = mmap(NULL, (size_t)n, PROT_READ, MAP_SHARED, fd, (off_t)at);
    if (p == MAP_FAILED)
        return fail(EC_EMMAP, errno, "mmap(%s, offset %llu, %llu bytes)", path, (unsigned long long)at,
                    (unsigned long long)n);
    *out = p;
    return EC_OK;
}

int ec_file_resident(const char *path, uint64_t offset, uint64_t len, uint64_t *resident_bytes) {
    if (!path || !resident_bytes) return fail(EC_EINVAL, 0, "ec_file_resident: NULL argument");
    *resident_bytes = 0;
    int fd;
    uint64_t aligned, pages = 0;
    int rc = open_span(path, offset, &len, &fd, &aligned);
    if (rc) return rc;
    uint64_t end = offset + len; /* mincore then reports the page cache, a piece at a time */
    for (uint64_t at = aligned; len && at < end && !rc; at += piece_bytes()) {
        uint64_t n = end - at < piece_bytes() ? end - at : piece_bytes(), got = 0;
        uint8_t *p = NULL;
        rc = map_piece(fd, path, at, n, &p);
        if (rc) break;
        rc = count_resident(p, n, &got);
        munmap(p, (size_t)n);
        pages += got;
    }
    close(fd);
    if (rc) return rc;
    *resident_bytes = pages * page_size();
    return EC_OK;
}


/* ------------------------------------------------------------------------ */
/* 4. bandwidth                                                             */
/* ------------------------------------------------------------------------ */

/* The storage's sequential read speed, measured the way the pager reads in readahead mode: the range
 * is dropped from the page cache, mapped, and faulted in with MADV_POPULATE_READ in CHUNK pieces (the
 * kernel's read-around, no copy to user space); where populate is unavailable, 4 MB preads. */

/* Time faulting [at, end) of fd in with MADV_POPULATE_READ, one CHUNK mapped at a time and dropped once read
 * (untimed): the calibration must never hold more than a chunk of the model resident (a 256 MB sample mapped
 * whole would overrun the engine's budget on a small device). EC_OK with *dt; EC_EUNSUPPORTED where a chunk
 * cannot be mapped or populated (an old kernel): the caller times preads instead; EC_EIO on a read error. */
static int time_populate(int fd, const char *path, uint64_t at, uint64_t end, double *dt) {
    *dt = 0;
    for (; at < end; at += CHUNK) {
        uint64_t n = end - at < CHUNK ? end - at : CHUNK;
        uint8_t *map = NULL;
        if (map_piece(fd, path, at, n, &map) != EC_OK) return EC_EUNSUPPORTED;
        double c0 = now_s();
        int prc = populate_pages(map, (size_t)n);
        *dt += now_s() - c0;
        munmap(map, (size_t)n);
        if (prc == EINVAL || prc == ENOSYS || prc == ENOTSUP) return EC_EUNSUPPORTED;
        if (prc) return fail(EC_EIO, prc, "madvise(MADV_POPULATE_READ) of %s", path);
        drop_file_pages(fd, at, n);
    }
    return EC_OK;
}

/* Time reading [offset, offset + len) of fd with 4 MB preads, each dropped once read (untimed); *got the bytes
 * read (fewer when the file ended early). */
static int time_preads(int fd, const char *path, uint64_t offset, uint64_t len, uint64_t *got, double *dt) {
    size_t bufsz = 4u << 20;
    uint8_t *buf = malloc(bufsz);
    if (!buf) return fail(EC_ENOMEM, errno, "malloc(%zu)", bufsz);
    double t0 = now_s();
    *got = 0;
    while (*got < len) {
        size_t want = len - *got < bufsz ? (size_t)(len - *got) : bufsz;
        ssize_t r = pread(fd, buf, want, (off_t)(offset + *got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int err = errno;
            free(buf);
            return fail(EC_EIO, err, "pread(%s)", path);
        }
        if (r == 0) break;
        double c1 = now_s();
        drop_file_pages(fd, offset + *got, (uint64_t)r);
        t0 += now_s() - c1;
        *got += (uint64_t)r;
    }
    *dt = now_s() - t0;
    free(buf);
    return EC_OK;
}

int ec_read_bandwidth(const char *path, uint64_t offset, uint64_t len, double *bytes_per_second) {
    if (!path || !bytes_per_second) return fail(EC_EINVAL, 0, "ec_read_bandwidth: NULL argument");
    int fd;
    uint64_t aligned, got = len;
    double dt = 0;
    int rc = open_span(path, offset, &len, &fd, &aligned);
    if (rc) return rc;
    rc = drop_file_pages(fd, offset, len);
    if (rc != 0) fprintf(stderr, "edgecad: warning: posix_fadvise(DONTNEED) failed: %s\n", strerror(rc));
    rc = len ? time_populate(fd, path, aligned, offset + len, &dt) : EC_OK;
    if (rc == EC_EUNSUPPORTED) { /* time preads instead, from the start */
        drop_file_pages(fd, offset, len);
        rc = time_preads(fd, path, offset, len, &got, &dt);
    }
    drop_file_pages(fd, offset, len);
    close(fd);
    if (rc) return rc;
    *bytes_per_second = dt > 0 ? (double)got / dt : 0.0;
    return EC_OK;
}

/* ------------------------------------------------------------------------ */
/* portability                                                              */
/* ------------------------------------------------------------------------ */

/* (posix_fadvise: bionic has it at API 21, the lowest the NDK builds for; posix_madvise, from API 23 only, is
 * used by the load guard alone, guard.c) */
int drop_file_pages(int fd, uint64_t off, uint64_t len) {
#ifdef POSIX_FADV_DONTNEED
    return posix_fadvise(fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
#else /* macOS: no way to drop a file's pages but through a mapping */
    (void)fd, (void)off, (void)len;
    return ENOTSUP;
#endif
}

int no_readahead(int fd) {
#ifdef POSIX_FADV_RANDOM
    return posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
#elif defined(F_RDAHEAD)
    return fcntl(fd, F_RDAHEAD, 0) == 0 ? 0 : errno;
#else
    (void)fd;
    return ENOTSUP;
#endif
}

int populate_pages(void *addr, size_t len) {
#ifdef MADV_POPULATE_READ
    return madvise(addr, len, MADV_POPULATE_READ) == 0 ? 0 : errno;
#else
    (void)addr, (void)len;
    return ENOTSUP;
#endif
}

int open_direct(const char *path, int *err) {
#if defined(O_DIRECT)
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
    *err = fd < 0 ? errno : 0;
    return fd;
#elif defined(F_NOCACHE)
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0 && fcntl(fd, F_NOCACHE, 1) != 0) {
        *err = errno;
        close(fd);
        return -1;
    }
    *err = fd < 0 ? errno : 0;
    return fd;
#else
    (void)path;
    *err = ENOTSUP;
    return -1;
#endif
}

void populate_write(void *addr, size_t len) {
#if defined(__linux__) && !defined(MADV_POPULATE_WRITE)
#define MADV_POPULATE_WRITE 23 /* Linux >= 5.14 */
#endif
#ifdef MADV_POPULATE_WRITE
    if (madvise(addr, len, MADV_POPULATE_WRITE) == 0) return;
#endif
    for (size_t i = 0; i < len; i += page_size()) ((volatile uint8_t *)addr)[i] = 0;
}

int ec_capabilities(void) {
    int caps = 0;
#ifdef POSIX_FADV_DONTNEED
    caps |= EC_CAP_DROP_PAGES;
#endif
#ifdef MADV_POPULATE_READ
    caps |= EC_CAP_POPULATE;
#endif
#ifdef __linux__
    caps |= EC_CAP_LOAD_GUARD | EC_CAP_FIND_MAPPING;
#endif
    return caps;
}

/* ------------------------------------------------------------------------ */
/* 6. interrupt                                                             */
/* ------------------------------------------------------------------------ */

/* Python sees Ctrl-C only between bytecodes: while a llama_decode waits on storage for seconds (an SD
 * card), or the pinned layers are read, it would not stop. A SIGINT handler chained in front of Python's
 * sets ec_interrupted_flag, which the waits above and llama.cpp's abort callback read; then Python's own
 * handler runs as before and raises KeyboardInterrupt once the call returns. */

int ec_interrupted_flag;
static int sigint_count; /* SIGINTs since the handler was installed, never cleared (ec_interrupt_count) */

int interrupted(void) { return __atomic_load_n(&ec_interrupted_flag, __ATOMIC_ACQUIRE); }

static struct sigaction prev_sigint;

static void on_sigint(int sig, siginfo_t *info, void *uc) {
    __atomic_store_n(&ec_interrupted_flag, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&sigint_count, 1, __ATOMIC_RELEASE);
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

int ec_interrupt_count(void) { return __atomic_load_n(&sigint_count, __ATOMIC_ACQUIRE); }

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

