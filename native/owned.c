/*
 * edgecad native library, section 3b: the owned residency. The pager's streamed layers are read with direct IO
 * (O_DIRECT on Linux, F_NOCACHE on macOS) into slots of anonymous memory the pager owns (huge pages where the
 * kernel gives them), and llama.cpp's weight tensors of a layer are pointed at its slot as the graph reaches them
 * (cb_eval's ask, before the node runs; at the file's mapping while the layer is not read). The pinned layers and
 * ranges are read the same way, once per settle, into a fixed pool. A pass puts nothing in the page cache, the
 * pager knows to the byte what it holds (anonymous memory, which a memory cgroup cannot reclaim from under a pass
 * as it can the page cache), and a slot is reused without being freed, zeroed or faulted again. (pager.c has the queue, the boundaries and the
 * page cache's residency.)
 */
#include <stddef.h>

#include "pager.h"

/* ------------------------------------------------------------------------ */
/* 3b. owned residency                                                      */
/* ------------------------------------------------------------------------ */

/* The part of ggml's struct ggml_tensor (ggml.h) this file reads and writes, as of the pinned llama.cpp;
 * ec_tensor_layout reports its offsets so that Python checks them on a real tensor before use. */
typedef struct gt {
    int type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
    int op;
    int32_t op_params[16];
    int32_t flags;
    struct gt *src[10];     /* GGML_MAX_SRC */
    struct gt *view_src;
    size_t view_offs;
    void *data;
    char name[64];          /* GGML_MAX_NAME */
    void *extra;
    char padding[8];
} gt;

#define DIO_ALIGN ((uint64_t)4096) /* buffer, offset and length alignment of a direct read (a page, >= a sector) */
#define HUGE_ALIGN ((uint64_t)2 << 20) /* the pool's alignment: a PMD huge page */

/* A block is where a weight lives: layer il (0 <= il < n_layers; streamed through the slots, or pinned), or the
 * pinned range n_layers + i (p->pinned[i]). */
typedef struct {
    char *name;   /* the tensor's name */
    uint64_t off; /* its file offset */
    int block;
    gt *t;        /* the graph's tensor of that name, once seen (NULL before) */
    void *orig;   /* t->data as llama.cpp set it: in the file's mapping */
} weight;

struct owned_state {
    int fd;              /* the file opened for direct reads, or -1: p->fd's plain reads, dropped after */
    uint8_t *pool;       /* [n_slots * slot_size] the slots, HUGE_ALIGN aligned */
    uint8_t *map;        /* the pool's mapping (pool_len bytes from here) */
    size_t map_len;
    uint64_t slot_size;  /* the largest streamed layer's DIO_ALIGN-aligned span */
    int n_slots;         /* the window, in layers (at most the streamed layers) */
    int *slot_of;        /* [n_layers] the slot holding layer il, -1 if none (IO thread writes, under mu) */
    int *free_slots;     /* [n_slots] stack of free slots (IO thread, or settle with the queue drained) */
    int n_free;
    uint8_t *fixed;      /* [fixed_len] the pinned blocks, read at settle */
    uint8_t *fixed_map;  /* its mapping (fixed_map_len bytes from here) */
    size_t fixed_map_len;
    uint64_t fixed_len;
    uint64_t *fixed_at;  /* [n_layers + n_pinned] offset in fixed of each pinned block's span */
    int fixed_ready;     /* 1 once the settle read them (compute thread and settle) */
    weight *w;           /* [n_w] sorted by name */
    int n_w;
    void *buffer;        /* without a known mapping: the ggml buffer of layer 0's weights, the file's mapping */
    gt **hkey;           /* [hcap] open-addressed table: tensor -> index in w (compute thread) */
    int *hval;
    int hcap;
};

static const ec_range *block_range(const ec_pager *p, int b) {
    return b < p->n_layers ? &p->layers[b] : &p->pinned[b - p->n_layers];
}

static int is_fixed(const ec_pager *p, int b) { return b >= p->n_layers || !p->streamed[b]; }

/* A block's bytes as read: DIO_ALIGN-aligned outward (within the file). */
static uint64_t span_lo(const ec_pager *p, int b) { return block_range(p, b)->off & ~(DIO_ALIGN - 1); }

static uint64_t span_hi(const ec_pager *p, int b) {
    const ec_range *r = block_range(p, b);
    return (r->off + r->len + DIO_ALIGN - 1) & ~(DIO_ALIGN - 1);
}

/* Anonymous memory of len bytes, HUGE_ALIGN aligned inside its mapping (*map, *map_len), given huge pages where
 * the kernel has them and faulted in: a direct read into memory not yet faulted took 4 KiB pages for half of it
 * (measured: 30 of 60 MB in huge pages), and compute then misses the TLB more. */
static int alloc_pool(uint64_t len, uint8_t **pool, uint8_t **map, size_t *map_len, const char *what) {
    *map_len = (size_t)(len + HUGE_ALIGN);
    void *m = mmap(NULL, *map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        *map_len = 0;
        return fail(EC_EMMAP, errno, "mmap of %llu bytes for %s", (unsigned long long)len, what);
    }
    *map = m;
    *pool = (uint8_t *)(((uintptr_t)m + HUGE_ALIGN - 1) & ~(uintptr_t)(HUGE_ALIGN - 1));
#ifdef MADV_HUGEPAGE
    madvise(*pool, (size_t)len, MADV_HUGEPAGE); /* (advice: the kernel may say no) */
#endif
    populate_write(*pool, (size_t)len);
    return EC_OK;
}

static uint8_t *slot_addr(const owned_state *o, int slot) { return o->pool + (uint64_t)slot * o->slot_size; }

/* ---- reads ---- */

/* Read n bytes at off into dst (DIO_ALIGN aligned; n too, but at the end of the file). A file system that takes
 * the descriptor but not the read (an alignment above a page) turns direct reads off for good, said once. */
int read_direct(ec_pager *p, uint8_t *dst, uint64_t off, uint64_t n) {
    owned_state *o = p->own;
    uint64_t want = (n + DIO_ALIGN - 1) & ~(DIO_ALIGN - 1), end = off + n;
    for (uint64_t got = 0; off + got < end;) {
        int fd = o->fd >= 0 ? o->fd : p->fd;
        ssize_t r = pread(fd, dst + got, (size_t)(want - got), (off_t)(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EINVAL && o->fd >= 0) {
            fprintf(stderr, "edgecad: warning: direct reads of the model file fail (%s): the pager reads through "
                    "the page cache and drops what it read\n", strerror(errno));
            close(o->fd);
            o->fd = -1;
            pthread_mutex_lock(&p->mu);
            p->st.direct_reads = 0;
            pthread_mutex_unlock(&p->mu);
            continue;
        }
        if (r <= 0) return fail(r == 0 ? EC_ECHANGED : EC_EIO, r < 0 ? errno : 0, "pread of the model file at %llu",
                                (unsigned long long)(off + got));
        got += (uint64_t)r;
    }
    if (o->fd < 0) {
        int rc = drop_file_pages(p->fd, off, n);
        if (rc) warn_once(p, "posix_fadvise(POSIX_FADV_DONTNEED)", rc);
    }
    return EC_OK;
}

static int owned_load(ec_pager *p, int il) {
    owned_state *o = p->own;
    if (o->n_free == 0) /* (the queue never wants more layers than the window: a bug if it does) */
        return fail(EC_EINVAL, 0, "no free slot for layer %d: the window holds %d layers", il, o->n_slots);
    int slot = o->free_slots[--o->n_free];
    uint64_t lo = span_lo(p, il), hi = span_hi(p, il);
    if (hi > p->file_size) hi = p->file_size;
    int rc = read_range(p, lo, hi - lo, slot_addr(o, slot));
    if (rc) {
        o->free_slots[o->n_free++] = slot;
        return rc;
    }
    pthread_mutex_lock(&p->mu);
    o->slot_of[il] = slot;
    pthread_mutex_unlock(&p->mu);
    return EC_OK;
}

static void owned_evict(ec_pager *p, int il) {
    owned_state *o = p->own;
    pthread_mutex_lock(&p->mu);
    int slot = o->slot_of[il];
    o->slot_of[il] = -1;
    pthread_mutex_unlock(&p->mu);
    if (slot >= 0) o->free_slots[o->n_free++] = slot;
}

static uint64_t owned_resident(const ec_pager *p, int il) {
    return p->own->slot_of[il] >= 0 ? span_hi(p, il) - span_lo(p, il) : 0;
}

/* ---- tensors ---- */

static int by_name(const void *a, const void *b) { return strcmp(((const weight *)a)->name, ((const weight *)b)->name); }

static int find_name(const owned_state *o, const char *name) {
    int lo = 0, hi = o->n_w - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(o->w[mid].name, name);
        if (c == 0) return mid;
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

static unsigned hash_of(const owned_state *o, const gt *t) {
    return (unsigned)((((uintptr_t)t >> 4) * 0x9E3779B97F4A7C15ull) >> 32) & (unsigned)(o->hcap - 1);
}

/* Whether t's bytes are in the file's mapping, where the pager may point them elsewhere: inside llama.cpp's mapping
 * where the pager knows it; else (macOS) in the ggml buffer of layer 0's weights, which a paged target computes
 * here (llama.cpp offloads the last layers). Anything else is a remote or GPU device's buffer. */
static int in_mapping(const ec_pager *p, owned_state *o, const gt *t, int k) {
    if (p->map) return (const uint8_t *)t->data >= p->map && (const uint8_t *)t->data < p->map + p->map_len;
    if (!o->buffer && o->w[k].block == 0) o->buffer = t->buffer;
    return o->buffer && t->buffer == o->buffer;
}

/* The weight `t` is (index in w), -1 if none: by address once seen, else by name (the first time). */
static int weight_of(ec_pager *p, owned_state *o, gt *t) {
    unsigned h = hash_of(o, t);
    for (; o->hkey[h]; h = (h + 1) & (unsigned)(o->hcap - 1))
        if (o->hkey[h] == t) return o->hval[h];
    if (t->op != 0) return -1; /* (a weight is a leaf: GGML_OP_NONE) */
    char name[sizeof t->name + 1];
    memcpy(name, t->name, sizeof t->name);
    name[sizeof t->name] = 0;
    int k = find_name(o, name);
    /* (not the pager's; a second tensor of that name; or not in the file's mapping yet known: left alone) */
    if (k < 0 || o->w[k].t || !in_mapping(p, o, t, k)) return -1;
    o->w[k].t = t;
    o->w[k].orig = t->data;
    o->hkey[h] = t; /* (the table holds 2x the weights: never full) */
    o->hval[h] = k;
    __atomic_add_fetch(&p->st.owned_weights, 1, __ATOMIC_RELAXED);
    return k;
}

/* Where weight k's bytes are now: in its block's slot (or the fixed pool) once its read completed, else in the
 * mapping. */
static void *where(ec_pager *p, int k) {
    owned_state *o = p->own;
    weight *w = &o->w[k];
    int il = w->block;
    if (is_fixed(p, il)) return o->fixed_ready ? o->fixed + o->fixed_at[il] + (w->off - span_lo(p, il)) : w->orig;
    pthread_mutex_lock(&p->mu);
    int slot = p->want[il] && p->completed >= p->load_ticket[il] ? o->slot_of[il] : -1;
    pthread_mutex_unlock(&p->mu);
    return slot >= 0 ? slot_addr(o, slot) + (w->off - span_lo(p, il)) : w->orig;
}

static void place(ec_pager *p, gt *t) {
    int k = weight_of(p, p->own, t);
    if (k >= 0) {
        t->data = where(p, k);
    } else if (t->view_src && (k = weight_of(p, p->own, t->view_src)) >= 0) { /* a view of a weight */
        t->view_src->data = where(p, k);
        t->data = (uint8_t *)t->view_src->data + t->view_offs;
    }
}

static void owned_place(ec_pager *p, void *node) {
    gt *n = node;
    for (int i = 0; i < 10; i++)
        if (n->src[i]) place(p, n->src[i]);
}

/* Every slot free, the tensors back at the mapping. */
static void owned_reset(ec_pager *p) {
    owned_state *o = p->own;
    for (int k = 0; k < o->n_w; k++)
        if (o->w[k].t) o->w[k].t->data = o->w[k].orig;
    pthread_mutex_lock(&p->mu);
    for (int il = 0; il < p->n_layers; il++) o->slot_of[il] = -1;
    pthread_mutex_unlock(&p->mu);
    o->n_free = 0;
    for (int s = o->n_slots - 1; s >= 0; s--) o->free_slots[o->n_free++] = s;
}

/* The fixed pool is read once (a settle after an error or a Ctrl-C keeps what an earlier one read whole). */
static int owned_settle(ec_pager *p) {
    owned_state *o = p->own;
    owned_reset(p);
    for (int b = 0; !o->fixed_ready && b < p->n_layers + p->n_pinned; b++) {
        if (!is_fixed(p, b) || !block_range(p, b)->len) continue;
        uint64_t lo = span_lo(p, b), hi = span_hi(p, b) < p->file_size ? span_hi(p, b) : p->file_size;
        int rc = read_range(p, lo, hi - lo, o->fixed + o->fixed_at[b]);
        if (rc) return rc;
    }
    o->fixed_ready = 1;
    return EC_OK;
}

static uint64_t owned_pinned(const ec_pager *p) { return p->own->fixed_ready ? p->own->fixed_len : 0; }

const layer_io owned_io = {owned_load, owned_evict, owned_resident, owned_settle, owned_pinned, owned_place};

/* ---- open / close ---- */

int owned_open(ec_pager *p, const ec_pager_spec *s) {
    owned_state *o = calloc(1, sizeof *o);
    if (!o) return fail(EC_ENOMEM, ENOMEM, "allocating the owned residency");
    p->own = o;
    o->fd = -1;
    int window = p->prm.depth + p->prm.lag + 1;
    o->n_slots = window < p->n_stream ? window : p->n_stream;
    for (int il = 0; il < p->n_layers; il++)
        if (p->streamed[il] && span_hi(p, il) - span_lo(p, il) > o->slot_size) o->slot_size = span_hi(p, il) - span_lo(p, il);
    o->slot_of = malloc(p->n_layers * sizeof *o->slot_of);
    o->free_slots = calloc(o->n_slots ? o->n_slots : 1, sizeof *o->free_slots);
    o->w = calloc(s->n_tensors ? s->n_tensors : 1, sizeof *o->w);
    for (o->hcap = 16; o->hcap < 2 * s->n_tensors; o->hcap *= 2) {
    }
    o->hkey = calloc(o->hcap, sizeof *o->hkey);
    o->hval = calloc(o->hcap, sizeof *o->hval);
    if (!o->slot_of || !o->free_slots || !o->w || !o->hkey || !o->hval) return fail(EC_ENOMEM, ENOMEM, "allocating the owned residency");
    int n_blocks = p->n_layers + p->n_pinned;
    for (int k = 0; k < s->n_tensors; k++) {
        const ec_tensor *t = &s->tensors[k];
        const ec_range *r = t->name && t->layer >= 0 && t->layer < n_blocks ? block_range(p, t->layer) : NULL;
        if (!r || t->off < r->off || t->off >= r->off + r->len)
            return fail(EC_EINVAL, 0, "ec_pager_open: tensor %d is not inside its layer or pinned range", k);
        if (!(o->w[o->n_w].name = strdup(t->name))) return fail(EC_ENOMEM, ENOMEM, "allocating the owned residency");
        o->w[o->n_w].off = t->off;
        o->w[o->n_w++].block = t->layer;
    }
    qsort(o->w, o->n_w, sizeof *o->w, by_name);
    if (!(o->fixed_at = calloc(n_blocks, sizeof *o->fixed_at))) return fail(EC_ENOMEM, ENOMEM, "allocating the owned residency");
    for (int b = 0; b < n_blocks; b++)
        if (is_fixed(p, b) && block_range(p, b)->len) {
            o->fixed_at[b] = o->fixed_len;
            o->fixed_len += span_hi(p, b) - span_lo(p, b);
        }
    size_t fixed_map_len;
    uint8_t *fixed_map;
    int rc = alloc_pool(o->n_slots * o->slot_size, &o->pool, &o->map, &o->map_len, "the streamed layers' slots");
    if (!rc && o->fixed_len) rc = alloc_pool(o->fixed_len, &o->fixed, &fixed_map, &fixed_map_len, "the pinned weights");
    if (rc) return rc;
    if (o->fixed_len) o->fixed_map = fixed_map, o->fixed_map_len = fixed_map_len;
    int err = 0;
    o->fd = open_direct(s->path, &err);
    if (o->fd < 0)
        fprintf(stderr, "edgecad: warning: %s cannot be read directly (%s): the pager reads through the page cache "
                "and drops what it read\n", s->path, strerror(err));
    p->st.owned_bytes = (uint64_t)o->n_slots * o->slot_size + o->fixed_len;
    p->st.direct_reads = o->fd >= 0;
    owned_reset(p);
    return EC_OK;
}

void owned_close(ec_pager *p) {
    owned_state *o = p->own;
    if (!o) return;
    for (int k = 0; k < o->n_w; k++) {
        if (o->w[k].t) o->w[k].t->data = o->w[k].orig; /* (llama.cpp frees the model after the pager) */
        free(o->w[k].name);
    }
    if (o->map) munmap(o->map, o->map_len);
    if (o->fixed_map) munmap(o->fixed_map, o->fixed_map_len);
    if (o->fd >= 0) close(o->fd);
    free(o->slot_of); free(o->free_slots); free(o->w); free(o->hkey); free(o->hval); free(o->fixed_at);
    free(o);
    p->own = NULL;
}

int ec_tensor_layout(uint64_t *offsets, int n) {
    if (!offsets || n < 5) return fail(EC_EINVAL, 0, "ec_tensor_layout: room for 5 offsets needed");
    offsets[0] = offsetof(gt, src);
    offsets[1] = offsetof(gt, view_src);
    offsets[2] = offsetof(gt, view_offs);
    offsets[3] = offsetof(gt, data);
    offsets[4] = offsetof(gt, name);
    return EC_OK;
}
