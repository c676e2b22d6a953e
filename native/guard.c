/*
 * edgecad native library, section 5: the load guard. llama.cpp's load of a paged model maps it without
 * reading it all (PLT hooks). (common.c has the shared helpers and the other sections.)
 */
#include "internal.h"
#ifdef __linux__
#include <link.h>
#endif

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

/* The hooks take the callers' ABI, not this file's (built with _FILE_OFFSET_BITS=64): the offset of the `mmap`
 * symbol is libc's own off_t. glibc and bionic: a long, 32 bits on a 32-bit libc (their 64-bit call is mmap64).
 * musl: 64 bits on every architecture (its off_t is always 64-bit, and `mmap` is its only symbol: a hook that read
 * a long on 32-bit ARM would read the stack slot before the offset). `mmap64` takes 64 bits. */
#if defined(__GLIBC__) || defined(__ANDROID__)
typedef long mmap_off;
#else
typedef int64_t mmap_off;
#endif

static void *hook_mmap(void *addr, size_t len, int prot, int flags, int fd, mmap_off off) {
    void *r = mmap(addr, len, prot, guard_flags(flags, fd), fd, (off_t)off);
    if (__atomic_load_n(&guard.on, __ATOMIC_ACQUIRE)) note_mapping(r, len, fd);
    return r;
}

#if defined(__GLIBC__) || defined(__ANDROID__) /* (musl has no separate mmap64) */
#define HOOK_MMAP64 1
static void *hook_mmap64(void *addr, size_t len, int prot, int flags, int fd, int64_t off) {
    void *r = mmap(addr, len, prot, guard_flags(flags, fd), fd, (off_t)off);
    if (__atomic_load_n(&guard.on, __ATOMIC_ACQUIRE)) note_mapping(r, len, fd);
    return r;
}
#endif

/* bionic has posix_madvise from API 23 on: below it, libllama cannot import it (nothing to hook), and the NDK's
 * headers hide its declaration. */
#if !defined(__ANDROID__) || __ANDROID_API__ >= 23
#define HOOK_POSIX_MADVISE 1
static int hook_posix_madvise(void *addr, size_t len, int advice) {
    uintptr_t a = (uintptr_t)addr;
    if (__atomic_load_n(&guard.on, __ATOMIC_ACQUIRE) && advice == POSIX_MADV_WILLNEED && a >= guard.lo &&
        a + len <= guard.hi) {
        guard.st.willneed_dropped += len;
        return 0;
    }
    return posix_madvise(addr, len, advice);
}
#endif

static const plt_hook hooks[] = {{"mmap", (void *)hook_mmap},
#ifdef HOOK_MMAP64
             {"mmap64", (void *)hook_mmap64},
#endif
#ifdef HOOK_POSIX_MADVISE
             {"posix_madvise", (void *)hook_posix_madvise},
#endif
};

void *ec_load_guard_hook(const char *symbol) {
    for (size_t h = 0; symbol && h < sizeof hooks / sizeof hooks[0]; h++)
        if (strcmp(symbol, hooks[h].name) == 0) return hooks[h].hook;
    return NULL;
}

#if UINTPTR_MAX > 0xffffffffu
#define R_SYM(info) ELF64_R_SYM(info)
#else
#define R_SYM(info) ELF32_R_SYM(info)
#endif

typedef struct {
    const char *lib;          /* the file name to find (a substring of the loaded object's path) */
    const plt_hook *hooks;    /* [n_hooks] the symbols to find */
    size_t n_hooks;
    plt_patch *patch;         /* [cap] where their slots go; *n so far */
    int cap, *n;
    int found;                /* objects whose path contains lib */
    char path[256];           /* the first one's path */
} find_ctx;

/* Record the slots of one relocation table whose symbol is hooked. */
static void scan_relocs(find_ctx *fc, uintptr_t base, const void *tab, size_t size, int rela, const ElfW(Sym) *sym,
                        const char *str) {
    size_t ent = rela ? sizeof(ElfW(Rela)) : sizeof(ElfW(Rel));
    for (size_t i = 0; i < size / ent; i++) {
        const ElfW(Rel) *r = (const ElfW(Rel) *)((const char *)tab + i * ent); /* Rela begins like Rel */
        const char *name = str + sym[R_SYM(r->r_info)].st_name;
        for (size_t h = 0; h < fc->n_hooks; h++) {
            if (strcmp(name, fc->hooks[h].name) != 0 || *fc->n == fc->cap) continue;
            plt_patch *pp = &fc->patch[(*fc->n)++];
            pp->slot = (void **)(base + r->r_offset);
            pp->saved = fc->hooks[h].hook; /* the hook to write; swapped with the old value when patched */
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
    for (int i = 0; i < info->dlpi_phnum; i++) {
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC) dyn = (const ElfW(Dyn) *)(base + info->dlpi_phdr[i].p_vaddr);
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
    if (jmprel) scan_relocs(fc, base, (const void *)AT(jmprel), pltrelsz, pltrel == DT_RELA, sym, str);
    if (rela) scan_relocs(fc, base, (const void *)AT(rela), relasz, 1, sym, str); /* GLOB_DAT: -fno-plt */
    if (rel) scan_relocs(fc, base, (const void *)AT(rel), relsz, 0, sym, str);
#undef AT
    return 0;
}

typedef struct {
    uintptr_t addr;
    char *path;
    size_t cap;
    int found;
} owner_ctx;

static int find_owner(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    owner_ctx *oc = data;
    for (int i = 0; i < info->dlpi_phnum && !oc->found; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD && oc->addr >= lo && oc->addr < lo + ph->p_memsz && info->dlpi_name &&
            info->dlpi_name[0]) {
            snprintf(oc->path, oc->cap, "%s", info->dlpi_name);
            oc->found = 1;
        }
    }
    return oc->found;
}

int plt_owner(const void *addr, char *path, size_t cap) {
    owner_ctx oc = {(uintptr_t)addr, path, cap, 0};
    if (addr) dl_iterate_phdr(find_owner, &oc);
    return oc.found ? EC_OK : fail(EC_EUNSUPPORTED, 0, "no loaded shared object holds %p", addr);
}

int plt_find(const char *lib, const plt_hook *hooks_, size_t n_hooks, plt_patch *patch, int cap, int *n, char *path,
             size_t path_cap) {
    find_ctx fc = {lib, hooks_, n_hooks, patch, cap, n, 0, ""};
    int before = *n;
    dl_iterate_phdr(find_slots, &fc);
    snprintf(path, path_cap, "%s", fc.path);
    if (fc.found == 1) return EC_OK;
    *n = before;
    return fail(EC_EUNSUPPORTED, 0, "%d loaded objects named like %s (need exactly one)", fc.found, lib);
}

/* The protection of the page holding addr, from /proc/self/maps; -1 when no mapping holds it. (The page of a
 * slot is asked, not computed from PT_GNU_RELRO: loaders round RELRO's end differently, glibc and musl down,
 * bionic up, so a slot in its last partial page is read-only on Android only.) */
static int page_prot(uintptr_t addr) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return -1;
    char line[512], perms[5] = "";
    unsigned long lo, hi;
    int prot = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) == 3 && addr >= lo && addr < hi) {
            prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
                   (perms[2] == 'x' ? PROT_EXEC : 0);
            break;
        }
    fclose(f);
    return prot;
}

/* Write v into a slot; a read-only slot (RELRO) is made writable for the write and given its protection back. */
int plt_write(plt_patch *pp, void *v) {
    uintptr_t page = (uintptr_t)pp->slot & ~(uintptr_t)(page_size() - 1);
    int prot = page_prot(page);
    if (prot < 0) return fail(EC_EUNSUPPORTED, 0, "import slot %p is in no mapping", (void *)pp->slot);
    if (!(prot & PROT_WRITE) && mprotect((void *)page, page_size(), prot | PROT_WRITE) != 0)
        return fail(EC_EUNSUPPORTED, errno, "mprotect of import slot %p", (void *)pp->slot);
    __atomic_store_n(pp->slot, v, __ATOMIC_SEQ_CST);
    if (!(prot & PROT_WRITE) && mprotect((void *)page, page_size(), prot) != 0)
        return fail(EC_EUNSUPPORTED, errno, "mprotect of import slot %p", (void *)pp->slot);
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
    char found[256];
    int rc = plt_find(lib_name, hooks, sizeof hooks / sizeof hooks[0], guard.patch,
                      (int)(sizeof guard.patch / sizeof guard.patch[0]), &guard.n_patch, found, sizeof found);
    if (rc) return rc;
    int maps = guard.n_patch; /* slots of mmap or mmap64 (saved holds the hook to write until patched) */
#ifdef HOOK_POSIX_MADVISE
    for (int i = 0; i < guard.n_patch; i++) maps -= guard.patch[i].saved == (void *)hook_posix_madvise;
#endif
    if (!maps) {
        guard.n_patch = 0;
        return fail(EC_EUNSUPPORTED, 0, "%s does not import mmap through a patchable slot", found);
    }
    __atomic_store_n(&guard.on, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < guard.n_patch; i++) {
        void *hook = guard.patch[i].saved;
        guard.patch[i].saved = __atomic_load_n(guard.patch[i].slot, __ATOMIC_SEQ_CST);
        rc = plt_write(&guard.patch[i], hook);
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
        int r = plt_write(&guard.patch[i], guard.patch[i].saved);
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

void *ec_load_guard_hook(const char *symbol) {
    (void)symbol;
    return NULL;
}

#endif

