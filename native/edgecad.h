/* edgecad native library: public interface (bound with ctypes in edgecad/native.py). */
#ifndef EDGECAD_H
#define EDGECAD_H

#include <stdint.h>

#define EC_VERSION 1

/* Status codes: every function returns one; ec_last_error() explains a failure. */
enum {
    EC_OK = 0,
    EC_EINVAL = 1,   /* bad argument */
    EC_EOPEN = 2,    /* open() failed */
    EC_ESTAT = 3,    /* fstat() failed */
    EC_EMMAP = 4,    /* mmap() failed */
    EC_EMINCORE = 5, /* mincore() failed */
    EC_ENOMEM = 6,   /* allocation failed */
};

int ec_version(void);
const char *ec_last_error(void);

/* Bytes of the pages covering [addr, addr+len) that are resident in RAM. */
int ec_mem_resident(const void *addr, uint64_t len, uint64_t *resident_bytes);

/* Bytes of the file range [offset, offset+len) that are in the page cache. */
int ec_file_resident(const char *path, uint64_t offset, uint64_t len, uint64_t *resident_bytes);

#endif
