/*
 * A test driver for edgecad's C library on its own (no Python, no llama.cpp): run natively by the suite and,
 * cross-compiled, under qemu-user as another architecture (tests/test_native.py). Prints one line per check,
 * "ok NAME: detail" or "FAIL NAME: why", and exits 1 if any check failed.
 *
 *   cc -std=gnu11 -Inative native/test_driver.c native/common.c native/pager.c native/guard.c native/remote.c \
 *      -lpthread -ldl
 *   cc -std=gnu11 -shared -fPIC -o libecstandin.so native/test_standin.c          (imports mmap)
 *   cc -std=gnu11 -shared -fPIC -D_FILE_OFFSET_BITS=64 -o libecstandin64.so native/test_standin.c   (mmap64)
 *   ./a.out SCRATCH_DIR [STANDIN_LIBRARY...]
 *
 * The load guard is checked on each stand-in library given (a libllama that maps as llama.cpp does); a static
 * build (musl under qemu) has no shared objects to patch, and says it skipped the check.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <link.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "edgecad.h"

#define LAYER (64u << 10)
#define N_LAYERS 8

static int failures;

static void check(int ok, const char *name, const char *detail) {
    printf("%s %s: %s\n", ok ? "ok" : "FAIL", name, detail);
    failures += !ok;
}

static const char *name_of(void *tensor) { return tensor; } /* a "tensor" here is its name */

/* ---- scratch files: written and out of the page cache ------------------------------------------------------ */

/* dir/ec-driver-PID.NAME of `layers` layers; each 8 bytes hold their own file offset (every page differs). */
static int scratch(const char *dir, const char *name, int layers, char *path, size_t cap) {
    snprintf(path, cap, "%s/ec-driver-%d.%s", dir, (int)getpid(), name);
    int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
    uint64_t *buf = malloc(LAYER);
    int ok = fd >= 0 && buf;
    for (int l = 0; ok && l < layers; l++) {
        for (unsigned i = 0; i < LAYER / 8; i++) buf[i] = (uint64_t)l * LAYER + i * 8;
        ok = write(fd, buf, LAYER) == (ssize_t)LAYER;
    }
    free(buf);
    if (ok) ok = fsync(fd) == 0;
    if (ok) posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    if (fd >= 0) close(fd);
    return ok ? 0 : -1;
}

/* ---- paging: each layer is resident when its boundary returns ----------------------------------------------- */

static void paging(const char *path, int readahead) {
    char name[64], detail[256];
    int fd = open(path, O_RDONLY);
    uint8_t *map = mmap(NULL, (size_t)N_LAYERS * LAYER, PROT_READ, MAP_SHARED, fd, 0);
    ec_range layers[N_LAYERS];
    uint8_t streamed[N_LAYERS];
    for (int l = 0; l < N_LAYERS; l++) layers[l] = (ec_range){(uint64_t)l * LAYER, LAYER}, streamed[l] = 1;
    ec_pager_spec spec = {path, (uint64_t)(uintptr_t)map, 0, (uint64_t)N_LAYERS * LAYER, layers, streamed, N_LAYERS,
                          NULL, 0, NULL, 0, {2, readahead ? N_LAYERS : 1, 0.0, 1, readahead, 0}, (void *)name_of, NULL, 0};
    /* (populated: no eviction during the pass, lag = every layer. These 64 KB layers are far smaller than the
     * folios the kernel's readahead makes, so evicting a neighbour would drop part of the layer being checked;
     * the engine never populates layers that small.) */
    ec_pager *p = NULL;
    snprintf(name, sizeof name, "paging-%s", readahead ? "readahead" : "exact");
    if (map == MAP_FAILED || ec_pager_open(&spec, &p) != EC_OK || ec_pager_settle(p) != EC_OK) {
        check(0, name, ec_last_error());
        return;
    }
    int all = 1, first_bad = -1;
    for (int l = 0; l < N_LAYERS; l++) {
        char tensor[32];
        snprintf(tensor, sizeof tensor, "attn_norm-%d", l);
        uint64_t res = 0;
        if (!ec_pager_cb_eval(tensor, false, p) || ec_mem_resident(map + (size_t)l * LAYER, LAYER, &res) != EC_OK ||
            res != LAYER) {
            if (all) first_bad = l;
            all = 0;
        }
    }
    ec_pager_stats st;
    ec_pager_get_stats(p, &st);
    snprintf(detail, sizeof detail, "%s; %llu bytes read, populate %s", all ? "every layer resident at its boundary"
             : "a layer not resident at its boundary", (unsigned long long)st.bytes_read,
             st.populate_ignored ? "returned without reading: preads instead" : "worked or not used");
    if (!all) snprintf(detail + strlen(detail), sizeof detail - strlen(detail), " (layer %d)", first_bad);
    check(all && st.bytes_read > 0, name, detail);
    ec_pager_close(p);
    munmap(map, (size_t)N_LAYERS * LAYER);
    close(fd);
}

/* ---- a file over 4 GiB (sparse): sizes and offsets past 32 bits, as on 32-bit ARM with large-file offsets -- */

#define GiB (1ull << 30)

static long map_page; /* the page size: what each maps_at call maps */

/* One page at `at` whose 8-byte words hold their own file offsets (as the scratch files' pages). */
static int write_page(int fd, uint64_t at) {
    uint64_t buf[65536 / 8];
    for (long i = 0; i < map_page / 8; i++) buf[i] = at + (uint64_t)i * 8;
    return pwrite(fd, buf, (size_t)map_page, (off_t)at) == map_page ? 0 : -1;
}

/* dir/ec-driver-large-PID.bin: 4 GiB + 1 MiB, a page written at 2.5 GiB and one at 4 GiB + a page (in the page
 * cache: written, not dropped). 0 or -1. */
static int large_scratch(const char *dir, char *path, size_t cap) {
    snprintf(path, cap, "%s/ec-driver-large-%d.bin", dir, (int)getpid());
    int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
    int ok = fd >= 0 && ftruncate(fd, (off_t)(4 * GiB + (1u << 20))) == 0 && write_page(fd, 5 * GiB / 2) == 0 &&
             write_page(fd, 4 * GiB + (uint64_t)map_page) == 0 && fsync(fd) == 0;
    if (fd >= 0) close(fd);
    return ok ? 0 : -1;
}

/* The first 8 bytes `map` maps of `path` at `off` hold `off` (the scratch files' words hold their offsets). */
static int maps_at(void *(*map)(int fd, uint64_t off), const char *path, uint64_t off) {
    int fd = open(path, O_RDONLY);
    uint64_t *p = fd >= 0 ? map(fd, off) : MAP_FAILED;
    int ok = p != MAP_FAILED && p[0] == off;
    if (p != MAP_FAILED) munmap(p, (size_t)map_page);
    if (fd >= 0) close(fd);
    return ok;
}

/* libc's own mmap, as this file calls it (64-bit offsets). */
static void *via_libc(int fd, uint64_t off) {
    return mmap(NULL, (size_t)map_page, PROT_READ, MAP_SHARED, fd, (off_t)off);
}

/* Residency of the whole file counts its written pages (a span of 4 GiB and more was cut to size_t on 32-bit: its
 * first MiB only, where none is), the MiB past 4 GiB holds the second page, and a read at 2.5 GiB is timed.
 * Returns whether mappings past 4 GiB work here, asked after the residency (the probe's fault reads around it):
 * qemu-user before 8.1 cuts a 32-bit process's mmap offset to 32 bits (a mapping there shows other bytes), and
 * then only the page at 2.5 GiB can be counted. */
static int large_file(const char *path) {
    char detail[512];
    uint64_t whole = ~0ull, past = ~0ull, page = (uint64_t)map_page;
    double bps = 0;
    int rc = ec_file_resident(path, 0, ~0ull, &whole);
    if (!rc) rc = ec_file_resident(path, 4 * GiB, 1u << 20, &past);
    if (!rc) rc = ec_read_bandwidth(path, 5 * GiB / 2, page, &bps);
    int wide = maps_at(via_libc, path, 4 * GiB + page);
    snprintf(detail, sizeof detail, "a 4 GiB + 1 MiB file with 2 pages cached: %llu bytes resident in all of it, "
             "%llu in its MiB past 4 GiB (%s); a read at 2.5 GiB %s", (unsigned long long)whole,
             (unsigned long long)past, wide ? "its page" : "not counted: mappings past 4 GiB show other bytes here, "
             "as qemu-user cuts a 32-bit process's mmap offsets to 32 bits", rc ? ec_last_error() : "done");
    check(!rc && whole >= (wide ? 2 : 1) * page && (!wide || past == page), "large-file", detail);
    return wide;
}

/* ---- the load guard's hooks, called through the prototypes libc's header gives their symbols ---------------- */

/* The `mmap` symbol's own prototype, whatever this file's _FILE_OFFSET_BITS: glibc's __off_t is that symbol's
 * offset type (a long); musl's off_t is 64-bit always. */
#ifdef __GLIBC__
typedef void *(*mmap_symbol)(void *, size_t, int, int, int, __off_t);
#define MMAP_SYMBOL_WIDE (sizeof(__off_t) == 8)
#else
typedef __typeof__(mmap) *mmap_symbol;
#define MMAP_SYMBOL_WIDE (sizeof(off_t) == 8)
#endif

static void *hook_fn; /* the hook via_mmap and via_mmap64 call */

static void *via_mmap(int fd, uint64_t off) {
    return ((mmap_symbol)hook_fn)(NULL, (size_t)map_page, PROT_READ, MAP_SHARED, fd, (off_t)off);
}

#if defined(__GLIBC__) || defined(__ANDROID__)
static void *via_mmap64(int fd, uint64_t off) {
    return ((__typeof__(mmap64) *)hook_fn)(NULL, (size_t)map_page, PROT_READ, MAP_SHARED, fd, (off64_t)off);
}
#endif

/* Each mmap hook maps the right bytes at a page's offset and, where its offset is 64-bit (and mappings past 4 GiB
 * work here: `wide`), past 4 GiB: it passed the caller's offset through the caller's ABI (on 32-bit ARM, a hook
 * reading a long where the caller passed 64 bits reads the padding before it). Runs in static builds too: the
 * hooks are called directly, without import slots. */
static void hook_abi(const char *path, const char *large, int wide) {
    static const struct {
        const char *symbol;
        void *(*via)(int, uint64_t);
        int wide; /* the symbol's offset is 64-bit */
    } calls[] = {
        {"mmap", via_mmap, MMAP_SYMBOL_WIDE},
#if defined(__GLIBC__) || defined(__ANDROID__)
        {"mmap64", via_mmap64, 1},
#endif
    };
    char detail[384] = "";
    int ok = 1;
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        hook_fn = ec_load_guard_hook(calls[i].symbol);
        int near = hook_fn && maps_at(calls[i].via, path, (uint64_t)map_page);
        int far = !(calls[i].wide && wide) ||
                  (hook_fn && maps_at(calls[i].via, large, 4 * GiB + (uint64_t)map_page));
        size_t n = strlen(detail);
        snprintf(detail + n, sizeof detail - n, "%s%s: %s at a page, %s past 4 GiB", i ? "; " : "", calls[i].symbol,
                 !hook_fn ? "no hook" : near ? "right" : "WRONG", !calls[i].wide ? "not asked (a 32-bit offset)"
                 : !wide ? "not asked (mappings there show other bytes here)" : far ? "right" : "WRONG");
        ok &= near && far;
    }
    check(ok, "guard-hook-abi", detail);
}

/* ---- load guard: a stand-in libllama maps a file without reading it ------------------------------------------ */

typedef int (*map_fn)(const char *path, long long off, void **addr, size_t *len); /* test_standin.c */

static void drop(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd >= 0) posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), close(fd);
}

/* `path` from `off`, dropped from the page cache then mapped by the stand-in: its resident bytes after the call
 * in *res (-1 when the call failed). The mapping stays (*addr, *len). */
static int map_cold(map_fn map, const char *path, long long off, void **addr, size_t *len, uint64_t *res) {
    drop(path);
    *res = ~0ull;
    int err = map(path, off, addr, len);
    if (!err && ec_mem_resident(*addr, *len, res) != EC_OK) *res = ~0ull;
    return err;
}

/* The guard on `lib` (dlopen'ed): mapping `path` under it reads nothing, `other` is mapped as asked, and after
 * ec_load_guard_end the same call reads `path` again. The stand-in maps from a page in, so a hook that read the
 * caller's offset in the wrong ABI (32-bit ARM: mmap's long, mmap64's 64 bits) would map other bytes. Where
 * MAP_POPULATE and WILLNEED read nothing even unguarded (as under qemu-user), residency cannot tell the guard's
 * work apart: the line says so, and only the guard's stats and the mapping's content are checked. */
static void load_guard(const char *lib, const char *path, const char *other) {
    char name[64], detail[640];
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    map_fn map = h ? (map_fn)dlsym(h, "ecstandin_map") : NULL;
    const char *(*symbol)(void) = h ? (const char *(*)(void))dlsym(h, "ecstandin_mmap_symbol") : NULL;
    snprintf(name, sizeof name, "load-guard-%s", symbol ? symbol() : "?");
    if (!map || !symbol) {
        check(0, name, dlerror());
        if (h) dlclose(h);
        return;
    }
    const char *base = strrchr(lib, '/') ? strrchr(lib, '/') + 1 : lib;
    long long off = sysconf(_SC_PAGESIZE);
    void *z, *a, *b, *c;
    size_t zlen = 0, alen = 0, blen = 0, clen = 0;
    uint64_t zres, ares, bres, cres;
    int e0 = map_cold(map, other, 0, &z, &zlen, &zres);     /* unguarded: does populating read here? */
    if (!e0) munmap(z, zlen);
    int rc = ec_load_guard_begin(path, base);
    if (e0 || rc != EC_OK) {
        snprintf(detail, sizeof detail, "unguarded call: %s; ec_load_guard_begin: %s", strerror(e0),
                 rc ? ec_last_error() : "ok");
        if (rc == EC_OK) ec_load_guard_end(NULL);
        check(0, name, detail);
        dlclose(h);
        return;
    }
    int e1 = map_cold(map, path, off, &a, &alen, &ares);    /* guarded: MAP_POPULATE and WILLNEED dropped */
    int e2 = map_cold(map, other, 0, &b, &blen, &bres);     /* another file under the guard: untouched */
    ec_load_guard_stats st = {0};
    rc = ec_load_guard_end(&st);
    uint8_t want[64] = {0};
    int fd = open(path, O_RDONLY);
    int same = !e1 && fd >= 0 && pread(fd, want, sizeof want, (off_t)off) == sizeof want &&
               memcmp(a, want, sizeof want) == 0;
    if (fd >= 0) close(fd);
    if (!e1) munmap(a, alen);
    if (!e2) munmap(b, blen);
    int e3 = map_cold(map, path, off, &c, &clen, &cres);    /* slots restored: populated as asked */
    if (!e3) munmap(c, clen);
    int seen = zres == zlen; /* populating reads: residency shows what the guard did */
    snprintf(detail, sizeof detail, "via %s, %d slots patched: MAP_POPULATE dropped %llu time(s), WILLNEED on %llu "
             "bytes; content at offset %lld %s; ", symbol(), st.slots, (unsigned long long)st.populate_dropped,
             (unsigned long long)st.willneed_dropped, off, same ? "right" : "WRONG");
    size_t n = strlen(detail);
    if (seen)
        snprintf(detail + n, sizeof detail - n, "guarded mapping %lld of %zu bytes resident, another file %lld of "
                 "%zu, after the end %lld of %zu", (long long)ares, alen, (long long)bres, blen, (long long)cres, clen);
    else
        snprintf(detail + n, sizeof detail - n, "residency not compared: unguarded, MAP_POPULATE and WILLNEED read "
                 "%lld of %zu bytes here (as under qemu-user)", (long long)zres, zlen);
    if (rc != EC_OK || e1 || e2 || e3)
        snprintf(detail + strlen(detail), sizeof detail - strlen(detail), "; end %d (%s), calls: %s / %s / %s", rc,
                 rc ? ec_last_error() : "ok", strerror(e1), strerror(e2), strerror(e3));
    check(rc == EC_OK && !e1 && !e2 && !e3 && st.slots >= 2 && st.populate_dropped == 1 &&
          st.willneed_dropped == alen && st.mapped_bytes == alen && same &&
          (!seen || (ares == 0 && bres == blen && cres == clen)), name, detail);
    dlclose(h);
}

static int first_has_interp(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    for (int i = 0; i < info->dlpi_phnum; i++) *(int *)data |= info->dlpi_phdr[i].p_type == PT_INTERP;
    return 1; /* the first object is the program */
}

/* 1 when this program has no dynamic loader (a static build): nothing to dlopen, no import slots to patch. */
static int static_build(void) {
    int interp = 0;
    dl_iterate_phdr(first_has_interp, &interp);
    return !interp;
}

/* ---- Ctrl-C: the C flag is set and the handler that was there still runs ----------------------------------- */

static volatile sig_atomic_t chained;
static void previous(int sig) { (void)sig; chained = 1; }

static void interrupt(void) {
    signal(SIGINT, previous);
    int rc = ec_interrupt_install();
    ec_interrupt_clear();
    raise(SIGINT);
    char detail[128];
    snprintf(detail, sizeof detail, "install %d, flag %d, previous handler %s", rc, ec_interrupt_pending(),
             chained ? "ran" : "did not run");
    check(rc == EC_OK && ec_interrupt_pending() == 1 && chained, "interrupt-chain", detail);
}

int main(int argc, char **argv) {
    char path[512], detail[256];
    int caps = ec_capabilities();
    snprintf(detail, sizeof detail, "drop pages %d, populate %d, load guard %d, find mapping %d, page size %ld",
             !!(caps & EC_CAP_DROP_PAGES), !!(caps & EC_CAP_POPULATE), !!(caps & EC_CAP_LOAD_GUARD),
             !!(caps & EC_CAP_FIND_MAPPING), sysconf(_SC_PAGESIZE));
    check(ec_version() == EC_VERSION, "capabilities", detail);
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    char other[512];
    if (scratch(dir, "bin", N_LAYERS, path, sizeof path) != 0 || scratch(dir, "other", 4, other, sizeof other) != 0) {
        check(0, "scratch", "cannot write the scratch files");
        return 1;
    }
    uint64_t res = ~0ull;
    int rc = ec_file_resident(path, 0, (uint64_t)N_LAYERS * LAYER, &res);
    snprintf(detail, sizeof detail, "%llu of %u bytes resident after a drop", (unsigned long long)res,
             N_LAYERS * LAYER);
    check(rc == EC_OK && res < (uint64_t)N_LAYERS * LAYER, "residency", detail);
    paging(path, 0);
    paging(path, 1);
    char large[512];
    map_page = sysconf(_SC_PAGESIZE);
    if (large_scratch(dir, large, sizeof large) != 0) {
        check(0, "large-file", "cannot write the sparse 4 GiB scratch file");
    } else {
        int wide = large_file(large); /* (mappings past 4 GiB work here) */
        hook_abi(path, large, wide);
    }
    unlink(large);
    if (argc <= 2 && static_build()) check(1, "load-guard", "skipped: static build, no shared objects to patch");
    else if (argc <= 2) check(0, "load-guard", "a dynamic build checks the guard: give the stand-in libraries");
    for (int i = 2; i < argc; i++) load_guard(argv[i], path, other);
    interrupt();
    unlink(path);
    unlink(other);
    return failures ? 1 : 0;
}
