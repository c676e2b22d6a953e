/* edgecad native library: the pager's state, shared by pager.c (the pager, and the page cache's residency) and
 * owned.c (the owned residency). Not part of the interface (edgecad.h). */
#ifndef EDGECAD_PAGER_H
#define EDGECAD_PAGER_H

#include "internal.h"

typedef struct owned_state owned_state; /* owned.c */

/* Where the weights live: one implementation per residency. The IO thread calls load and evict, in queue order;
 * settle runs with the queue drained; resident, pinned and place are called by the compute thread. */
typedef struct {
    int (*load)(ec_pager *p, int il);              /* read streamed layer il; EC_OK or an EC_* error (message set) */
    void (*evict)(ec_pager *p, int il);            /* drop it (best effort: a failure warns once) */
    uint64_t (*resident)(const ec_pager *p, int il); /* bytes of it held now */
    int (*settle)(ec_pager *p);                    /* read the pinned layers and ranges in; EC_OK or an EC_* error */
    uint64_t (*pinned)(const ec_pager *p);         /* bytes of them held now */
    void (*place)(ec_pager *p, void *node);        /* cb_eval's ask, before node runs (NULL: nothing to do) */
} layer_io;

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
    int sync_ready;          /* mu and the condition variables are initialised */
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
    int populate_checked;    /* 1 once a populate was seen to bring its pages in (IO thread only) */
    int fake_populate;       /* tests: populate returns success without reading (EC_FAULT_POPULATE_NOOP) */
    uint8_t *scratch;        /* [CHUNK] pread fallback buffer (IO thread only) */

    /* residency, in bytes, last measured (compute thread only) */
    uint64_t *layer_res;     /* [n_layers] */
    uint8_t *remeasure;      /* [n_layers] 1 = evicted since last measured (set by the IO thread, under mu) */
    uint64_t fixed_res;      /* pinned ranges + pinned layers + evict_pass ranges */
    ec_pager_stats st;       /* guarded by mu */

    const layer_io *lio;     /* how a streamed layer is read, dropped and counted: cache_io, or owned_io */
    owned_state *own;        /* the owned residency's state (owned.c), NULL with the page cache's */
};



#pragma GCC visibility push(hidden)

extern const layer_io cache_io; /* pager.c: the layers are the file's pages in llama.cpp's mapping */
extern const layer_io owned_io; /* owned.c: the layers are read into slots the pager owns */

/* pager.c, for owned.c */
void warn_once(ec_pager *p, const char *what, int err);
/* Read [off, off+len) of the file: into llama.cpp's mapping (dst NULL) or into dst (direct reads, DIO_ALIGN
 * aligned; owned.c: read_direct). Checks the file's size first, throttles, stops on Ctrl-C or close. */
int read_range(ec_pager *p, uint64_t off, uint64_t len, uint8_t *dst);

/* owned.c */
int owned_open(ec_pager *p, const ec_pager_spec *s); /* the slots, the direct descriptor, the tensor table */
void owned_close(ec_pager *p);                       /* tensors pointed back at the mapping; slots freed */
int read_direct(ec_pager *p, uint8_t *dst, uint64_t off, uint64_t n);

#pragma GCC visibility pop

#endif
