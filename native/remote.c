/*
 * edgecad native library, section 8: remote devices (llama.cpp's RPC backend, ggml-rpc). What Python cannot do
 * safely itself: ggml's abort path and a device's reported memory. (common.c has the shared helpers.)
 */
#include "internal.h"

/* ------------------------------------------------------------------------ */
/* 8. remote devices                                                        */
/* ------------------------------------------------------------------------ */

/* ggml's RPC client aborts the whole process when a server goes away: its dispatcher thread, which does every
 * exchange with the server, calls GGML_ABORT("Remote RPC server crashed ...") (ggml-rpc.cpp), and so does a
 * connect or handshake that fails. With the trap installed, ggml's abort callback (ggml_set_abort_callback)
 * sees such an abort first: it records the message and parks the thread that met it for good, instead of
 * returning to ggml_abort, which would abort(). Whoever waits on that thread waits forever, so edgecad makes
 * every call that may reach a server from a watched thread (edgecad.rpc.watched), and gives up on it when
 * ec_remote_lost says so. Every other abort is left as it was (the previous callback, or ggml's message). */

typedef void (*abort_fn)(const char *message);
typedef abort_fn (*set_abort_fn)(abort_fn callback);

static abort_fn previous_abort;
static int remote_lost;             /* set once a server was lost (never cleared: its dispatcher is parked) */
static char remote_message[EC_ERRBUF]; /* ggml's message for it */

/* An abort of ggml's RPC client: its message begins with the source file, ggml-rpc.cpp. */
static int is_remote_failure(const char *m) {
    return m && strstr(m, "ggml-rpc.cpp:") != NULL;
}

static void on_abort(const char *message) {
    if (is_remote_failure(message)) {
        static int first = 1;
        if (__atomic_exchange_n(&first, 0, __ATOMIC_ACQ_REL)) { /* the message first, then the flag */
            snprintf(remote_message, sizeof remote_message, "%s", message);
            __atomic_store_n(&remote_lost, 1, __ATOMIC_RELEASE);
        }
        for (;;) pause(); /* parked: the watched caller stops waiting for it */
    }
    if (previous_abort) previous_abort(message);
    else fprintf(stderr, "%s\n", message ? message : "ggml aborted");
}

int ec_remote_trap_install(void *set_abort_callback) {
    static int installed;
    if (!set_abort_callback) return fail(EC_EINVAL, 0, "ec_remote_trap_install: no ggml_set_abort_callback");
    if (!installed) previous_abort = ((set_abort_fn)set_abort_callback)(on_abort);
    installed = 1;
    return EC_OK;
}

int ec_remote_lost(char *out, size_t cap) {
    if (!__atomic_load_n(&remote_lost, __ATOMIC_ACQUIRE)) return 0;
    if (out && cap) snprintf(out, cap, "%s", remote_message);
    return 1;
}

/* ggml's CPU device reports all of the machine's physical memory as free (ggml-cpu.cpp), and an RPC server
 * announces what its device reports. ec_device_announce_memory makes the device report `free` and `total`
 * instead: it replaces get_memory, the third function of the device's interface (struct ggml_backend_device
 * begins with struct ggml_backend_device_i: get_name, get_description, get_memory, ...; ggml-backend-impl.h of
 * the llama.cpp that llama-cpp-python pins). The caller checks with ggml_backend_dev_memory that it took. One
 * device per process (an RPC server exposes one). */

typedef void (*get_memory_fn)(void *dev, size_t *free, size_t *total);
static size_t announced_free, announced_total;

static void announced_memory(void *dev, size_t *free, size_t *total) {
    (void)dev;
    *free = announced_free;
    *total = announced_total;
}

int ec_device_announce_memory(void *dev, uint64_t free, uint64_t total) {
    if (!dev || free > total) return fail(EC_EINVAL, 0, "ec_device_announce_memory: bad device or sizes");
    announced_free = (size_t)free, announced_total = (size_t)total;
    ((get_memory_fn *)dev)[2] = announced_memory;
    return EC_OK;
}
