/*
 * edgecad native library, section 3: the pager. It streams a model's layers through a memory budget: an IO
 * thread reads ahead and evicts, driven by llama.cpp's cb_eval at every layer boundary. (common.c has the
 * shared helpers and the other sections.)
 */
#include "pager.h"

/* ------------------------------------------------------------------------ */
/* 3. pager                                                                 */
/* ------------------------------------------------------------------------ */

void warn_once(ec_pager *p, const char *what, int err) {
    pthread_mutex_lock(&p->mu);
    int first = p->st.advise_failures++ == 0;
    pthread_mutex_unlock(&p->mu);
    if (first) fprintf(stderr, "edgecad: warning: %s failed: %s (residency may exceed the budget)\n", what, strerror(err));
}

/* Page-aligned span of the mapping covering a file range: outward (to read) or inward (to drop). */
static int span(const ec_pager *p, uint64_t off, uint64_t len, int outward, uint8_t **addr, size_t *n) {
    uint64_t ps = page_size();
    if (!p->map) return 0; /* (owned, where this platform cannot tell where llama.cpp mapped the file: macOS) */
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
    /* Until one is seen to work, a populate of a span that was not resident is verified: under emulation
     * (qemu-user) and in some sandboxes the call returns 0 without reading anything; the pager then preads from
     * now on. (A span resident before proves nothing, nor does a file whose pages mincore cannot see: it reads
     * "all resident" before as after, and is never judged.) */
    uint64_t before = an, res = 0;
    if (!p->populate_checked && ec_mem_resident(a, an, &before) != EC_OK) before = an;
    int rc = __atomic_load_n(&p->fake_populate, __ATOMIC_ACQUIRE) ? 0 : populate_pages(a, an);
    if (rc == 0) {
        if (!p->populate_checked && before < an / 2 && ec_mem_resident(a, an, &res) == EC_OK && res < an / 2) {
            p->use_populate = 0;
            pthread_mutex_lock(&p->mu);
            p->st.populate_ignored = 1;
            pthread_mutex_unlock(&p->mu);
            fprintf(stderr, "edgecad: warning: madvise(MADV_POPULATE_READ) returned without reading (%llu of %llu "
                    "bytes resident): the pager reads with pread instead\n", (unsigned long long)res,
                    (unsigned long long)an);
            return EC_OK;
        }
        if (before < an / 2) p->populate_checked = 1;
        *done = 1;
        return EC_OK;
    }
    if (rc == EINVAL || rc == ENOSYS || rc == ENOTSUP) {
        p->use_populate = 0; /* old kernel, or not Linux: compute takes minor faults */
        return EC_OK;
    }
    return fail(rc == EFAULT ? EC_ECHANGED : EC_EIO, rc, "madvise(MADV_POPULATE_READ)");
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
int read_range(ec_pager *p, uint64_t off, uint64_t len, uint8_t *dst) {
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
        if (!rc) rc = dst ? read_direct(p, dst + done, off + done, n) : read_chunk(p, off + done, n);
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
    int rc = drop_file_pages(p->fd, off, len);
    if (rc != 0 && !(rc == ENOTSUP && p->own)) /* (owned holds no layer there: only what a load read stays) */
        warn_once(p, "posix_fadvise(POSIX_FADV_DONTNEED)", rc);
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

/* The page cache's residency: a layer, and the pinned part, are file pages in llama.cpp's mapping. */
static int cache_load(ec_pager *p, int il) { return read_range(p, p->layers[il].off, p->layers[il].len, NULL); }

static uint64_t cache_resident(const ec_pager *p, int il) { return resident(p, p->layers[il].off, p->layers[il].len); }

static int cache_settle(ec_pager *p) {
    int rc = EC_OK;
    for (int i = 0; i < p->n_pinned && !rc; i++) rc = read_range(p, p->pinned[i].off, p->pinned[i].len, NULL);
    for (int il = 0; il < p->n_layers && !rc; il++)
        if (!p->streamed[il]) rc = read_range(p, p->layers[il].off, p->layers[il].len, NULL);
    return rc;
}

/* By mincore; where mincore cannot see this file, by the sizes the settle read. */
static uint64_t cache_pinned(const ec_pager *p) {
    uint64_t r = 0;
    for (int i = 0; i < p->n_pinned; i++) r += p->prm.measure ? resident(p, p->pinned[i].off, p->pinned[i].len) : p->pinned[i].len;
    for (int il = 0; il < p->n_layers; il++)
        if (!p->streamed[il]) r += p->prm.measure ? cache_resident(p, il) : p->layers[il].len;
    return r;
}

const layer_io cache_io = {cache_load, evict_layer, cache_resident, cache_settle, cache_pinned, NULL};

/* The pager's first error and this thread's message for it: cb_eval then aborts the graph. (mu held) */
static void record_error(ec_pager *p, int rc) {
    if (!rc || p->error) return;
    __atomic_store_n(&p->error, rc, __ATOMIC_RELEASE); /* (stopped() reads it without the mutex) */
    snprintf(p->error_text, sizeof p->error_text, "%s", ec_errbuf);
}

/* A Ctrl-C stops the pass (at a boundary, or between two through llama.cpp's abort callback): its window is
 * left half-read, and a read the IO thread is in must stop too. The pager's error until a settle: the next
 * completion's recover. (mu held) */
static void note_interrupt(ec_pager *p) {
    if (!p->error && interrupted()) {
        fail(EC_ECANCELED, 0, "interrupted");
        record_error(p, EC_ECANCELED);
    }
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
            rc = p->lio->load(p, op.layer);
        } else if (op.op == OP_EVICT) {
            p->lio->evict(p, op.layer);
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
 * (edgecad/plan/paging.py: PagerParams.window_layers). */
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

/* What stays resident whatever the pass: the pinned part as the residency holds it, and the rows of the per-pass
 * ranges a pass read (the page cache's: by mincore, where it can see this file). */
static uint64_t fixed_resident(const ec_pager *p) {
    uint64_t r = p->lio->pinned(p);
    for (int i = 0; p->prm.measure && i < p->n_evict; i++) r += resident(p, p->evict_pass[i].off, p->evict_pass[i].len);
    return r;
}

static void measure(ec_pager *p, int j, int pass_start) {
    if (pass_start) p->fixed_res = fixed_resident(p);
    int lo = j - p->prm.lag - 1, hi = j + p->prm.depth + p->prm.lag; /* + lag: ec_pager_pass_end reads a whole window */
    if (hi - lo + 1 > p->n_stream || p->prm.measure > 1) { lo = 0; hi = p->n_stream - 1; }
    for (int k = lo; k <= hi; k++) {
        int il = p->ring[((k % p->n_stream) + p->n_stream) % p->n_stream];
        __atomic_store_n(&p->remeasure[il], 0, __ATOMIC_RELAXED);
        p->layer_res[il] = p->lio->resident(p, il);
    }
    for (int il = 0; il < p->n_layers; il++) /* evictions that finished after their layer left the window */
        if (__atomic_exchange_n(&p->remeasure[il], 0, __ATOMIC_RELAXED))
            p->layer_res[il] = p->lio->resident(p, il);
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
    note_interrupt(p);
    int err = p->error;
    pthread_mutex_unlock(&p->mu);
    if (!err && (p->prm.measure || p->own) && p->n_stream > 0) measure(p, j >= 0 ? j : p->next_ring[il], pass_start);
    return err;
}

bool ec_pager_cb_eval(void *tensor, bool ask, void *user_data) {
    ec_pager *p = user_data;
    const char *name = p->name_fn(tensor);
    int is_boundary = name && strncmp(name, "attn_norm-", 10) == 0;
    int il = is_boundary ? atoi(name + 10) : -1;
    if (ask) {
        if (p->lio->place) p->lio->place(p, tensor); /* before the node runs: its weights where they are */
        return is_boundary && il < p->n_layers; /* (layers past the pager's live elsewhere: a remote device) */
    }
    if (!is_boundary) return true;
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
    note_interrupt(p);
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
    }
    if (p->sync_ready) {
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->work);
        pthread_cond_destroy(&p->done);
        pthread_cond_destroy(&p->gate);
    }
    owned_close(p);
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

typedef struct {
    uint64_t off; /* the layer's first byte in the file */
    int il;       /* the layer */
} layer_at;

static int by_offset(const void *a, const void *b) {
    uint64_t x = ((const layer_at *)a)->off, y = ((const layer_at *)b)->off;
    return x < y ? -1 : x > y;
}

/* The rings (streamed layers in compute order) and each layer's streamed file neighbours: consecutive in the
 * file, less than a page apart, no pinned or per-pass range between (evicting one reaches into the other). */
static int index_layers(ec_pager *p) {
    int n = p->n_layers;
    for (int il = 0; il < n; il++) {
        p->ring_pos[il] = -1;
        p->file_prev[il] = p->file_next[il] = -1;
        if (p->streamed[il]) { p->ring_pos[il] = p->n_stream; p->ring[p->n_stream++] = il; }
        else p->want[il] = 1; /* pinned: always wanted, never queued */
    }
    for (int il = n - 1, next = 0; il >= 0; il--) { /* first streamed layer after il, wrapping */
        p->next_ring[il] = next % (p->n_stream ? p->n_stream : 1);
        if (p->streamed[il]) next = p->ring_pos[il];
    }
    layer_at *order = malloc(n * sizeof *order);
    int m = 0;
    if (!order) return fail(EC_ENOMEM, ENOMEM, "allocating the pager");
    for (int il = 0; il < n; il++)
        if (p->layers[il].len) order[m++] = (layer_at){p->layers[il].off, il};
    qsort(order, m, sizeof *order, by_offset);
    for (int i = 1; i < m; i++) {
        int k = order[i - 1].il, il = order[i].il;
        uint64_t end = p->layers[k].off + p->layers[k].len, start = p->layers[il].off;
        if (!p->streamed[k] || !p->streamed[il] || end > start || start - end >= page_size()) continue;
        int between = 0;
        for (int j = 0; j < p->n_pinned; j++) between |= p->pinned[j].off < start && p->pinned[j].off + p->pinned[j].len > end;
        for (int j = 0; j < p->n_evict; j++)
            between |= p->evict_pass[j].off < start && p->evict_pass[j].off + p->evict_pass[j].len > end;
        if (!between) { p->file_prev[il] = k; p->file_next[k] = il; }
    }
    free(order);
    return EC_OK;
}

/* The fd and the mapping advised for how the pager reads. Exact mode (layers small next to read_ahead_kb:
 * read-around would pull in far more than the budget): no readahead on the pager's fd nor on faults in
 * llama.cpp's mapping. Readahead mode: the kernel's read-around (up to read_ahead_kb around each fault,
 * reserved by the budget plan) keeps the device busy (see read_range); token-embedding rows stay
 * MADV_RANDOM (compute faults there). */
static void advise(ec_pager *p) {
    if (!p->prm.readahead) {
        int arc = no_readahead(p->fd);
        if (arc != 0) warn_once(p, "posix_fadvise(POSIX_FADV_RANDOM)", arc);
    }
    uint8_t *ma;
    size_t mn;
    if (span(p, p->map_off, p->map_len, 1, &ma, &mn) &&
        madvise(ma, mn, p->prm.readahead ? MADV_NORMAL : MADV_RANDOM) != 0)
        warn_once(p, "madvise(MADV_NORMAL / MADV_RANDOM)", errno);
    for (int i = 0; p->prm.readahead && i < p->n_evict; i++)
        if (span(p, p->evict_pass[i].off, p->evict_pass[i].len, 1, &ma, &mn) && madvise(ma, mn, MADV_RANDOM) != 0)
            warn_once(p, "madvise(MADV_RANDOM)", errno);
    /* owned: a streamed layer's tensor used through the mapping before its read completed (a norm before the
     * layer's boundary) faults in its own page, not a read-around of the layer */
    for (int il = 0; p->own && il < p->n_layers; il++)
        if (p->streamed[il] && span(p, p->layers[il].off, p->layers[il].len, 1, &ma, &mn) && madvise(ma, mn, MADV_RANDOM) != 0)
            warn_once(p, "madvise(MADV_RANDOM)", errno);
}

int ec_pager_open(const ec_pager_spec *s, ec_pager **out) {
    if (!s || !out || !s->path || (!s->map_addr && !s->params.owned) || !s->layers || !s->streamed || s->n_layers <= 0 || !s->name_fn ||
        s->params.depth < 0 || s->params.lag < 1 || s->n_pinned < 0 || s->n_evict < 0 ||
        (s->params.owned && (s->n_tensors < 0 || (s->n_tensors && !s->tensors))))
        return fail(EC_EINVAL, 0, "ec_pager_open: bad argument%s",
                    s && s->params.lag < 1 ? " (lag must be >= 1: lag 0 evicts the layer about to run)" : "");
    *out = NULL;
    ec_pager *p = calloc(1, sizeof *p);
    if (!p) return fail(EC_ENOMEM, errno, "calloc(ec_pager)");
    int n = s->n_layers, rc;
    p->fd = -1;
    p->map = (uint8_t *)(uintptr_t)s->map_addr;
    p->map_off = s->map_offset;
    p->map_len = s->map_len;
    p->n_layers = n;
    p->prm = s->params;
    if (p->prm.depth > n) p->prm.depth = n; /* a window never holds more than every layer */
    if (p->prm.lag > n) p->prm.lag = n;
    p->throttle_bps = p->prm.throttle_bps;
    p->name_fn = (const char *(*)(const void *))s->name_fn;
    p->use_populate = 1;
    p->n_pinned = s->n_pinned;
    p->n_evict = s->n_evict;
    p->q_cap = 4 * n + 16;
    p->layers = dup_array(s->layers, n, sizeof *s->layers);
    p->streamed = dup_array(s->streamed, n, 1);
    p->pinned = dup_array(s->pinned, s->n_pinned, sizeof *s->pinned);
    p->evict_pass = dup_array(s->evict_each_pass, s->n_evict, sizeof *s->evict_each_pass);
    p->ring = calloc(n, sizeof *p->ring);
    p->ring_pos = calloc(n, sizeof *p->ring_pos);
    p->next_ring = calloc(n, sizeof *p->next_ring);
    p->file_prev = calloc(n, sizeof *p->file_prev);
    p->file_next = calloc(n, sizeof *p->file_next);
    p->q = calloc(p->q_cap, sizeof *p->q);
    p->want = calloc(n, 1);
    p->load_ticket = calloc(n, sizeof *p->load_ticket);
    p->layer_res = calloc(n, sizeof *p->layer_res);
    p->remeasure = calloc(n, 1);
    p->scratch = malloc(CHUNK);
    if (!p->layers || !p->streamed || !p->pinned || !p->evict_pass || !p->ring || !p->ring_pos || !p->next_ring ||
        !p->file_prev || !p->file_next || !p->q || !p->want || !p->load_ticket || !p->layer_res || !p->remeasure ||
        !p->scratch) {
        rc = fail(EC_ENOMEM, ENOMEM, "allocating the pager");
        goto fail;
    }
    if ((rc = index_layers(p)) || (rc = open_file(s->path, &p->fd, &p->file_size))) goto fail;
    int prc = pthread_mutex_init(&p->mu, NULL);
    if (!prc && !(prc = cond_init(&p->work)) && !(prc = cond_init(&p->done)) && !(prc = cond_init(&p->gate)))
        p->sync_ready = 1;
    else {
        rc = fail(EC_ETHREAD, prc, "initialising the pager's mutex and condition variables");
        goto fail;
    }
    p->lio = s->params.owned ? &owned_io : &cache_io;
    if (s->params.owned && (rc = owned_open(p, s)) != EC_OK) goto fail;
    advise(p);
    if ((prc = pthread_create(&p->io, NULL, io_main, p)) != 0) {
        rc = fail(EC_ETHREAD, prc, "pthread_create(IO thread)");
        goto fail;
    }
    p->io_started = 1;
    *out = p;
    return EC_OK;
fail:
    ec_pager_close(p); /* (it leaves this thread's message alone) */
    return rc;
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
    int rc = p->lio->settle(p); /* the pinned part read in (owned: every slot free too) */
    char why[sizeof ec_errbuf]; /* the failure's message, before the evictions below can overwrite it */
    snprintf(why, sizeof why, "%s", rc ? ec_errbuf : "");
    /* then drop the rest: what a whole-file load read, and what the kernel read ahead past the pinned ranges */
    for (int il = 0; il < p->n_layers; il++) /* (with the folios they share with their streamed neighbours) */
        if (p->streamed[il]) evict_layer(p, il);
    for (int i = 0; i < p->n_evict; i++) evict_range(p, p->evict_pass[i].off, p->evict_pass[i].len);
    p->fixed_res = fixed_resident(p);
    for (int il = 0; il < p->n_layers; il++)
        p->layer_res[il] = p->streamed[il] ? p->lio->resident(p, il) : 0;
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
    out->owned_weights = __atomic_load_n(&p->st.owned_weights, __ATOMIC_RELAXED);
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
    if (code == EC_FAULT_POPULATE_NOOP) { /* (the IO thread is idle: drained) */
        p->populate_checked = 0;
        __atomic_store_n(&p->fake_populate, 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&p->mu);
        return EC_OK;
    }
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

