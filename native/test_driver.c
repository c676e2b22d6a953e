/*
 * A test driver for edgecad's C library on its own (no Python, no llama.cpp): run natively by the suite and,
 * cross-compiled, under qemu-user as another architecture (tests/test_native.py). Prints one line per check,
 * "ok NAME: detail" or "FAIL NAME: why", and exits 1 if any check failed.
 *
 *   cc -std=gnu11 -Inative native/test_driver.c native/common.c native/pager.c native/guard.c -lpthread
 *   ./a.out SCRATCH_DIR
 */
#define _GNU_SOURCE
#include <fcntl.h>
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

/* ---- a scratch file of N_LAYERS layers, written and out of the page cache ----------------------------------- */

static int scratch(const char *dir, char *path, size_t cap) {
    snprintf(path, cap, "%s/ec-driver-%d.bin", dir, (int)getpid());
    int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
    if (fd < 0) return -1;
    char *buf = malloc(LAYER);
    for (unsigned i = 0; i < LAYER; i++) buf[i] = (char)(i * 7);
    for (int l = 0; l < N_LAYERS; l++)
        if (write(fd, buf, LAYER) != (ssize_t)LAYER) return free(buf), close(fd), -1;
    free(buf);
    fsync(fd);
#ifdef POSIX_FADV_DONTNEED
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
#endif
    close(fd);
    return 0;
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
                          NULL, 0, NULL, 0, {2, readahead ? N_LAYERS : 1, 0.0, 1, readahead}, (void *)name_of};
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

/* ---- a file over 2 GiB (sparse): sizes and offsets past 32 bits, as on 32-bit ARM with large-file offsets -- */

static void large_file(const char *dir) {
    char path[512], detail[256];
    snprintf(path, sizeof path, "%s/ec-driver-large-%d.bin", dir, (int)getpid());
    int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
    const uint64_t size = 3ull << 30, at = (5ull << 29); /* 3 GiB, a page written at 2.5 GiB */
    char page[4096];
    memset(page, 0x5a, sizeof page);
    int ok = fd >= 0 && ftruncate(fd, (off_t)size) == 0 && pwrite(fd, page, sizeof page, (off_t)at) == sizeof page;
    if (fd >= 0) fsync(fd), close(fd);
    uint64_t res = ~0ull;
    double bps = 0;
    int rc1 = ok ? ec_file_resident(path, at, sizeof page, &res) : -1;
    int rc2 = ok ? ec_read_bandwidth(path, at, sizeof page, &bps) : -1;
    snprintf(detail, sizeof detail, "a 3 GiB file: residency at 2.5 GiB %s, a read there %s",
             rc1 == EC_OK ? "measured" : ec_last_error(), rc2 == EC_OK ? "done" : ec_last_error());
    check(ok && rc1 == EC_OK && rc2 == EC_OK, "large-file", detail);
    unlink(path);
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
    if (scratch(argc > 1 ? argv[1] : "/tmp", path, sizeof path) != 0) {
        check(0, "scratch", "cannot write the scratch file");
        return 1;
    }
    uint64_t res = ~0ull;
    int rc = ec_file_resident(path, 0, (uint64_t)N_LAYERS * LAYER, &res);
    snprintf(detail, sizeof detail, "%llu of %u bytes resident after a drop", (unsigned long long)res,
             N_LAYERS * LAYER);
    check(rc == EC_OK && res < (uint64_t)N_LAYERS * LAYER, "residency", detail);
    paging(path, 0);
    paging(path, 1);
    large_file(argc > 1 ? argv[1] : "/tmp");
    interrupt();
    unlink(path);
    return failures ? 1 : 0;
}
