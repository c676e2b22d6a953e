/*
 * edgecad native library, section 8: remote devices (llama.cpp's RPC backend, ggml-rpc). What Python cannot do
 * safely itself: ggml's abort path, the options of the sockets ggml opens, and a device's reported memory.
 * (common.c has the shared helpers; guard.c the import-slot patching.)
 */
#include "internal.h"
#ifdef __linux__
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/time.h>
#endif

/* ------------------------------------------------------------------------ */
/* 8. remote devices                                                        */
/* ------------------------------------------------------------------------ */

/* ggml's RPC client aborts the whole process when a server goes away: its dispatcher thread, which does every
 * exchange with the server, calls GGML_ABORT("Remote RPC server crashed ...") (ggml-rpc.cpp), and so does a
 * connect or handshake that fails. With the trap installed, ggml's abort callback (ggml_set_abort_callback)
 * sees such an abort first: it records the message and parks the thread that met it for good, instead of
 * returning to ggml_abort, which would abort(). Whoever waits on that thread waits forever, so edgecad makes
 * every call that may reach a server from a watched thread (edgecad.rpc.client.watched), and gives up on it when
 * ec_remote_lost says so. Every other abort is left as it was (the previous callback, or ggml's message). */

typedef void (*abort_fn)(const char *message);
typedef abort_fn (*set_abort_fn)(abort_fn callback);

static abort_fn previous_abort;
static int remote_lost;             /* set once a server was lost (never cleared: its dispatcher is parked) */
static char remote_message[EC_ERRBUF]; /* why: ggml's message, or the reason given to ec_remote_give_up */
static int remote_errno;            /* errno where ggml's RPC client failed (0: unknown, or given up) */

/* An abort of ggml's RPC client: its message begins with the source file, ggml-rpc.cpp. */
static int is_remote_failure(const char *m) {
    return m && strstr(m, "ggml-rpc.cpp:") != NULL;
}

/* The first loss is the one reported: its message first, then the flag. */
static void mark_lost(const char *message, int err) {
    static int first = 1;
    if (!__atomic_exchange_n(&first, 0, __ATOMIC_ACQ_REL)) return;
    snprintf(remote_message, sizeof remote_message, "%s", message ? message : "lost");
    remote_errno = err;
    __atomic_store_n(&remote_lost, 1, __ATOMIC_RELEASE);
}

static void on_abort(const char *message) {
    int err = errno; /* the failed recv's or send's: what RPC_STATUS_ASSERT follows (ggml logs, then aborts) */
    if (is_remote_failure(message)) {
        mark_lost(message, err);
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

int ec_remote_lost_errno(void) {
    return __atomic_load_n(&remote_lost, __ATOMIC_ACQUIRE) ? remote_errno : 0;
}

/* ggml's RPC client has no timeouts: a server that is stopped (SIGSTOP, a debugger) or a machine that sleeps or
 * leaves the network after a request was sent keeps its dispatcher in recv() for good, and everything waiting on
 * it. ggml opens its sockets itself (transport.cpp: socket, TCP_NODELAY, connect), one per server, again whenever
 * the last user of a connection went (a load opens several), so options cannot be set once from outside after a
 * connect. ec_remote_sockets_install patches the `connect` and `accept` import slots of the loaded object that
 * holds ggml-rpc (the same import-slot patch as the load guard, guard.c; permanent): every socket it connects gets
 * its options before its first byte, whenever it is opened. Walking /proc/self/fd instead would find a socket
 * only after it was opened, racing the exchange it was opened for.
 *
 * A client socket gets (a failed setsockopt leaves that option out: best effort, never a failed connect):
 * - SO_RCVTIMEO and SO_SNDTIMEO of `timeout` seconds: a recv or send that moves no byte for that long fails, ggml's
 *   client aborts, and the trap above reports the loss with errno EAGAIN. It bounds the longest silence a healthy
 *   server may keep within one exchange: its part of a pass (a prompt batch through its layers on a slow CPU, or
 *   from a server whose memory pages to slow storage), or a tensor read from its --cache on an SD card (edgecad's
 *   default, 120 s, edgecad/rpc/__init__.py, is several times the longest such wait we estimate; a transfer that moves
 *   bytes never times out, however long it takes).
 * - TCP_USER_TIMEOUT of the same: data sent and not acknowledged for that long (the machine left mid-send) fails
 *   the connection (ETIMEDOUT), where TCP alone retransmits for about 15 minutes.
 * - TCP keepalive after KEEP_IDLE s without traffic, then KEEP_COUNT probes KEEP_INTERVAL s apart: a machine
 *   that sleeps or leaves the network is noticed in 25 s (ETIMEDOUT), also while the client waits for an answer
 *   whose request was acknowledged, and while the engine is idle (its next request then fails at once). A healthy
 *   server's kernel answers probes whatever its process is doing, so keepalive never ends a slow pass.
 * A server's accepted socket gets the keepalive only (an engine may stay idle between requests for hours): a
 * client machine that left no longer holds a server, which serves one client at a time, for good.
 *
 * The client sockets are remembered (fd and both addresses) so that ec_remote_give_up can shut them down. */

#define KEEP_IDLE 10
#define KEEP_INTERVAL 5
#define KEEP_COUNT 3
#define MAX_CLIENTS 16

#ifdef __linux__

typedef struct {
    int fd;                               /* -1: a free entry */
    struct sockaddr_storage local, peer;  /* the connection it was, so a reused fd is never mistaken for it */
    socklen_t local_len, peer_len;
} client_socket;

static pthread_mutex_t sockets_mu = PTHREAD_MUTEX_INITIALIZER;
static client_socket clients[MAX_CLIENTS];
static int next_client;
static unsigned timeout_ms; /* for sockets connected from now on */

static void set_keepalive(int fd) {
    int on = 1, idle = KEEP_IDLE, interval = KEEP_INTERVAL, count = KEEP_COUNT;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
}

static void set_timeouts(int fd, unsigned ms) {
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms); /* (Linux 2.6.37 on; older kernels refuse it) */
}

static void remember(int fd) {
    client_socket c = {fd, {0}, {0}, sizeof c.local, sizeof c.peer};
    if (getsockname(fd, (struct sockaddr *)&c.local, &c.local_len) != 0 ||
        getpeername(fd, (struct sockaddr *)&c.peer, &c.peer_len) != 0)
        return;
    pthread_mutex_lock(&sockets_mu);
    clients[next_client] = c; /* (the oldest is forgotten: ggml holds one connection per server at a time) */
    next_client = (next_client + 1) % MAX_CLIENTS;
    pthread_mutex_unlock(&sockets_mu);
}

static int tcp(const struct sockaddr *addr) {
    return addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6);
}

static int hook_connect(int fd, const struct sockaddr *addr, socklen_t len) {
    int rc = connect(fd, addr, len), err = errno;
    if (rc == 0 && tcp(addr)) {
        set_keepalive(fd);
        set_timeouts(fd, __atomic_load_n(&timeout_ms, __ATOMIC_RELAXED));
        remember(fd);
    }
    errno = err;
    return rc;
}

static int hook_accept(int fd, struct sockaddr *addr, socklen_t *len) {
    int c = accept(fd, addr, len), err = errno;
    if (c >= 0) set_keepalive(c);
    errno = err;
    return c;
}

static const plt_hook socket_hooks[] = {{"connect", (void *)hook_connect}, {"accept", (void *)hook_accept}};

int ec_remote_sockets_install(void *rpc_function, double timeout_seconds) {
    static int installed;
    if (!(timeout_seconds >= 0.001 && timeout_seconds <= 4e6))
        return fail(EC_EINVAL, 0, "ec_remote_sockets_install: timeout %g s is not between 1 ms and 46 days",
                    timeout_seconds);
    __atomic_store_n(&timeout_ms, (unsigned)(timeout_seconds * 1000), __ATOMIC_RELAXED);
    if (__atomic_load_n(&installed, __ATOMIC_ACQUIRE)) return EC_OK;
    plt_patch patch[8];
    int n = 0;
    char object[256], path[256];
    int rc = plt_owner(rpc_function, object, sizeof object);
    if (!rc) rc = plt_find(object, socket_hooks, 2, patch, 8, &n, path, sizeof path);
    if (!rc && n == 0) rc = fail(EC_EUNSUPPORTED, 0, "%s does not import connect through a patchable slot", path);
    for (int i = 0; i < n && !rc; i++) rc = plt_write(&patch[i], patch[i].saved);
    if (!rc) {
        for (int i = 0; i < MAX_CLIENTS; i++) clients[i].fd = -1;
        __atomic_store_n(&installed, 1, __ATOMIC_RELEASE);
    }
    return rc;
}

/* The fd still is the connection remembered: a closed one's number may have been reused since. */
static int same_connection(const client_socket *c) {
    struct sockaddr_storage local, peer;
    socklen_t local_len = sizeof local, peer_len = sizeof peer;
    return c->fd >= 0 && getsockname(c->fd, (struct sockaddr *)&local, &local_len) == 0 &&
           getpeername(c->fd, (struct sockaddr *)&peer, &peer_len) == 0 && local_len == c->local_len &&
           peer_len == c->peer_len && memcmp(&local, &c->local, local_len) == 0 &&
           memcmp(&peer, &c->peer, peer_len) == 0;
}

static void shut_clients(void) {
    pthread_mutex_lock(&sockets_mu);
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (same_connection(&clients[i])) shutdown(clients[i].fd, SHUT_RDWR);
    pthread_mutex_unlock(&sockets_mu);
}

#else /* no import slots to patch: ggml's sockets keep its defaults (no timeout) */

int ec_remote_sockets_install(void *rpc_function, double timeout_seconds) {
    (void)rpc_function, (void)timeout_seconds;
    return fail(EC_EUNSUPPORTED, 0, "socket options on ggml's RPC connections need Linux");
}

static void shut_clients(void) {}

#endif

/* Giving up on a server (a Ctrl-C while a call waited on it): it is lost from now on, as if ggml had aborted, and
 * every connection to a server is shut down. A dispatcher blocked in recv() or send() then fails at once, aborts
 * and is parked by the trap: nothing the engine gave up goes on using its contexts in the background, and the
 * server is free for another engine. */
int ec_remote_give_up(const char *why) {
    mark_lost(why, 0);
    shut_clients();
    return EC_OK;
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
