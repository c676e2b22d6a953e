/* edgecad native library: public interface (bound with ctypes in edgecad/native.py; built from common.c,
 * pager.c and guard.c, which share internal.h). */
#ifndef EDGECAD_H
#define EDGECAD_H

#include <stdbool.h>
#include <stdint.h>

#define EC_VERSION 15

/* Status codes: every function returns one; ec_last_error() explains a failure. */
enum {
    EC_OK = 0,
    EC_EINVAL = 1,   /* bad argument */
    EC_EOPEN = 2,    /* open() failed */
    EC_ESTAT = 3,    /* fstat() failed */
    EC_EMMAP = 4,    /* mmap() failed */
    EC_EMINCORE = 5, /* mincore() failed */
    EC_ENOMEM = 6,   /* allocation failed */
    EC_ETHREAD = 7,  /* pthread_create() failed */
    EC_ECHANGED = 8, /* the model file changed size under the pager */
    EC_EIO = 9,      /* reading the file failed */
    EC_EUNSUPPORTED = 10, /* the load guard cannot apply in this process (no patchable libllama) */
    EC_ECANCELED = 11,    /* interrupted by Ctrl-C (SIGINT, see ec_interrupt_install) */
};

int ec_version(void);

/* What this platform's build can do (bits): drop a file's pages from the page cache (posix_fadvise), fault a
 * mapped span in (MADV_POPULATE_READ; the kernel may still refuse it), patch libllama's mmap for the load guard,
 * find llama.cpp's mapping of a model (/proc/self/maps). Paging a target needs DROP_PAGES and FIND_MAPPING. */
enum { EC_CAP_DROP_PAGES = 1, EC_CAP_POPULATE = 2, EC_CAP_LOAD_GUARD = 4, EC_CAP_FIND_MAPPING = 8 };
int ec_capabilities(void);
const char *ec_last_error(void);
/* "EC_OK", "EC_EINVAL", ...: the name of a status code (NULL past the last), so bindings check their copy. */
const char *ec_status_name(int code);

/* Bytes of the pages covering [addr, addr+len) that are resident in RAM. */
int ec_mem_resident(const void *addr, uint64_t len, uint64_t *resident_bytes);

/* Bytes of the file range [offset, offset+len) that are in the page cache. */
int ec_file_resident(const char *path, uint64_t offset, uint64_t len, uint64_t *resident_bytes);

/* ---- pager: stream a model's layers through a memory budget ---------------------------- */

typedef struct {
    uint64_t off; /* first byte, as a file offset */
    uint64_t len; /* bytes */
} ec_range;

typedef struct {
    int depth;           /* read-ahead window, in streamed layers; 0 = demand: read at the boundary, compute waits
                            (depth and lag above the layer count are clamped to it) */
    int lag;             /* evict streamed layer j-lag at layer j's boundary, >= 1 (evicting fresh pages leaks;
                            0 would evict the layer about to run) */
    double throttle_bps; /* storage throttle in bytes per second; 0 = none */
    int measure;         /* 1 = mincore residency of the window at every layer boundary; 2 = of every layer */
    int readahead;       /* 1 = the kernel's readahead on the pager's reads (fast; reads up to read_ahead_kb past
                            a range); 0 = exact reads (POSIX_FADV_RANDOM) */
    int owned;           /* 1 = the owned residency: streamed layers read with direct IO into slots the pager owns,
                            their tensors pointed there (needs the tensor table); 0 = the page cache's */
} ec_pager_params;

typedef struct {
    uint64_t bytes_read;     /* bytes the IO thread read (populated) */
    uint64_t io_wait_ns;     /* time compute waited for layers at boundaries */
    uint64_t io_busy_ns;     /* time the IO thread spent reading (throttle sleeps included) */
    uint64_t resident_now;   /* resident bytes of the mapping at the last measurement */
    uint64_t peak_resident;  /* largest resident_now since the last reset */
    uint64_t boundaries;     /* layer boundaries seen */
    uint64_t passes;         /* passes over the layers (a pass starts at the first layer) */
    uint64_t advise_failures;/* failed madvise/fadvise calls (each also warned once on stderr) */
    uint64_t gate_wait_ns;   /* time a gated draft held while the target computed */
    uint64_t draft_layers_in_pass; /* draft layers computed during a target pass (while it waited on IO) */
    uint64_t populate_ignored; /* 1 once MADV_POPULATE_READ was seen to return without reading: reads are preads */
    uint64_t owned_bytes;    /* bytes of the slots the owned residency holds (0: the page cache's residency) */
    uint64_t direct_reads;   /* 1 = the owned residency's reads bypass the page cache (O_DIRECT / F_NOCACHE); 0 =
                                plain reads, dropped from the page cache after each (a file system without it) */
    uint64_t owned_weights;  /* weight tensors the owned residency found in the graphs and points at its memory */
} ec_pager_stats;

typedef struct ec_pager ec_pager; /* opaque */

/* A weight tensor of a streamed layer, for the owned residency: the graph's tensor of that name is pointed at its
 * layer's slot while the layer is read, at the file's mapping otherwise. */
typedef struct {
    const char *name; /* the GGUF tensor name, as llama.cpp names the tensor */
    uint64_t off;     /* its first byte, as a file offset */
    int layer;        /* its layer (streamed) */
} ec_tensor;

/* What a pager streams, and how. */
typedef struct {
    const char *path;               /* the GGUF file */
    uint64_t map_addr;              /* where llama.cpp mapped it: the address of file offset map_offset */
    uint64_t map_offset;
    uint64_t map_len;               /* bytes mapped */
    const ec_range *layers;         /* [n_layers] file range of layer il */
    const uint8_t *streamed;        /* [n_layers] 1 = stream it, 0 = pinned */
    int n_layers;
    const ec_range *pinned;         /* [n_pinned] extra ranges kept resident (output, norms) */
    int n_pinned;
    const ec_range *evict_each_pass;/* [n_evict] ranges dropped after every pass (token embeddings, read by row) */
    int n_evict;
    ec_pager_params params;
    void *name_fn;                  /* ggml_get_name */
    const ec_tensor *tensors;       /* [n_tensors] the streamed layers' tensors (params.owned) */
    int n_tensors;
} ec_pager_spec;

int ec_pager_open(const ec_pager_spec *spec, ec_pager **out);
/* Stops the IO thread (a read in flight stops at its next chunk) and frees the pager. The caller first joins
 * every thread that may call ec_pager_gate_cb_eval (the draft's decodes): a draft held at the gate is let go,
 * but one that has yet to reach it would touch freed memory. */
void ec_pager_close(ec_pager *p);
/* Back to the state after load (and clear an IO error): read the pinned ranges, drop every streamed layer
 * and the evict_each_pass ranges, start reading the first pass's window (read-ahead mode). */
int ec_pager_settle(ec_pager *p);
/* The llama.cpp cb_eval: a layer boundary at each "attn_norm-<il>" node. */
bool ec_pager_cb_eval(void *tensor, bool ask, void *user_data);
int ec_pager_get_stats(ec_pager *p, ec_pager_stats *out);
void ec_pager_reset_peak(ec_pager *p);
/* Before a target decode beside which the draft runs: the gate holds the draft from the start. */
int ec_pager_pass_begin(ec_pager *p);
/* After every target decode: release the gated draft, start reading the next pass's first window. */
int ec_pager_pass_end(ec_pager *p);
/* The draft context's cb_eval (user_data: the target's pager): holds the draft while the target computes. */
bool ec_pager_gate_cb_eval(void *tensor, bool ask, void *user_data);
/* Tests: once the reads in flight are done, the pager's next read fails with `code` (an EC_* error); or, with
 * EC_FAULT_POPULATE_NOOP, MADV_POPULATE_READ from then on returns success without reading (as under qemu-user
 * and in some sandboxes), and the next populate is verified again. */
#define EC_FAULT_POPULATE_NOOP 1000
int ec_pager_inject_fault(ec_pager *p, int code);
/* Change the storage throttle of an open pager (bytes per second, 0 = none): tests stall the storage with it. */
int ec_pager_set_throttle(ec_pager *p, double bytes_per_second);
/* EC_OK, or the first error the IO thread met (then cb_eval aborts the graph; ec_pager_settle recovers);
 * ec_last_error() then gives the IO thread's message. */
int ec_pager_error(ec_pager *p);

/* The byte offsets in ggml's struct ggml_tensor the owned residency reads and writes, as this library was built:
 * offsets[0..4] = src[0], view_src, view_offs, data, name. The caller checks them against a real tensor of the
 * ggml it runs with before asking for params.owned (edgecad/native.py: owned_supported). */
int ec_tensor_layout(uint64_t *offsets, int n);

/* Sequential read bandwidth of a file range after dropping it from the page cache (bytes/s), read the way
 * the pager reads large layers: mapped and faulted in with MADV_POPULATE_READ (4 MB preads without it). */
int ec_read_bandwidth(const char *path, uint64_t offset, uint64_t len, double *bytes_per_second);

/* ---- load guard: llama.cpp maps a paged model without reading it all ------------------ */

typedef struct {
    uint64_t populate_dropped; /* libllama mmap calls of the guarded file whose MAP_POPULATE was dropped */
    uint64_t willneed_dropped; /* bytes of POSIX_MADV_WILLNEED advice on that mapping not given */
    uint64_t mapped_bytes;     /* bytes of the guarded file libllama mapped */
    int slots;                 /* libllama import slots patched */
} ec_load_guard_stats;

/* Patch the mmap / mmap64 / posix_madvise import slots of the one loaded object whose path contains
 * lib_name so that mapping `path` reads nothing; EC_EUNSUPPORTED when that cannot apply. */
int ec_load_guard_begin(const char *path, const char *lib_name);
/* Restore the slots; *out (may be NULL) gets what the guard dropped. */
int ec_load_guard_end(ec_load_guard_stats *out);
/* Tests: the hook the guard writes into the slots of `symbol` ("mmap", "mmap64", "posix_madvise"), to be called
 * with the prototype libc's header gives that symbol (with no guard on, it maps as asked); NULL where the symbol is
 * not hooked on this platform. */
void *ec_load_guard_hook(const char *symbol);

/* ---- interrupt: Ctrl-C reaches C code that waits --------------------------------------- */

/* Chain a SIGINT handler in front of the current one (Python's): it sets a flag that the pager's waits,
 * its reads in every thread (EC_ECANCELED), the draft's gate and ec_abort_callback read, then runs the
 * previous handler (or SIG_DFL's action; nothing for SIG_IGN). */
int ec_interrupt_install(void);
void ec_interrupt_clear(void);   /* before a call that a Ctrl-C should stop */
int ec_interrupt_pending(void);  /* 1 once a SIGINT came since the last clear */
/* SIGINTs the handler has seen, never cleared: a wait tells a Ctrl-C that came during it (and a second one) from one
 * that came before, in any thread (the server's worker never sees KeyboardInterrupt). */
int ec_interrupt_count(void);
/* llama.cpp's abort callback (llama_set_abort_callback): stop the graph on Ctrl-C. */
bool ec_abort_callback(void *data);

/* ---- log: llama.cpp's log callback (llama_log_set), in C ------------------------------- */

void ec_log_callback(int level, const char *text, void *user_data); /* level: enum ggml_log_level */
void ec_log_set_verbose(int verbose);  /* 1 = print llama.cpp's log to stderr */
/* The last `last` error lines logged since the previous call, joined by " | " into out; then forgotten. */
int ec_log_take_errors(char *out, size_t cap, int last);

/* ---- remote devices: llama.cpp's RPC backend (ggml-rpc) -------------------------------- */

/* Install, through ggml's ggml_set_abort_callback (its address), a trap for the aborts of ggml's RPC client
 * (a server gone, a failed connect): the thread that met one is parked instead of aborting the process, and
 * ec_remote_lost reports it. Other aborts go on as before. Idempotent. */
int ec_remote_trap_install(void *set_abort_callback);
/* 1 once a remote device was lost in this process (ggml's message, or ec_remote_give_up's reason, copied into
 * out), else 0. */
int ec_remote_lost(char *out, size_t cap);
/* The errno where ggml's RPC client failed: EAGAIN when the server sent nothing for the sockets' timeout,
 * ETIMEDOUT when its machine stopped answering TCP (keepalive, unacknowledged data); 0 when unknown or given up. */
int ec_remote_lost_errno(void);
/* Patch the `connect` and `accept` import slots of the loaded object holding `rpc_function` (a function of ggml's
 * RPC backend) for good: every socket ggml's RPC client connects from now on gets TCP keepalive, and receive, send
 * and unacknowledged-data timeouts of `timeout_seconds` (a call then fails instead of waiting for good on a server
 * that stopped answering); every connection an RPC server accepts gets keepalive. A second call changes the
 * timeout of later connections. EC_EUNSUPPORTED where slots cannot be patched (not Linux). */
int ec_remote_sockets_install(void *rpc_function, double timeout_seconds);
/* Give up on the remote devices (a Ctrl-C while a call waited on one): they are lost from now on (`why` is what
 * ec_remote_lost reports, unless a loss came first) and every connection ggml's RPC client made is shut down, so
 * that a dispatcher waiting on one fails at once and is parked by the trap. */
int ec_remote_give_up(const char *why);
/* Make a ggml device (ggml_backend_dev_t) report `free` and `total` bytes of memory: what an RPC server
 * exposing it announces. */
int ec_device_announce_memory(void *dev, uint64_t free, uint64_t total);

#endif
