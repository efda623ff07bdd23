/* Checks shared by the C tests: a failure names the file, the line, the call, the status and
 * kvferry's message, then exits non-zero. */
#ifndef KVFERRY_TEST_CHECK_H
#define KVFERRY_TEST_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvferry.h>

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

/* The call must return `expected` and, when that is an error, leave a message behind. */
#define CHECK_STATUS(expected, call)                                                               \
    do {                                                                                           \
        kvferry_status status_ = (call);                                                           \
        if (status_ != (expected)) {                                                               \
            fprintf(stderr, "%s:%d: %s returned %s, expected %s: %s\n", __FILE__, __LINE__, #call, \
                    kvferry_status_name(status_), kvferry_status_name(expected),                   \
                    kvferry_last_error_message());                                                 \
            exit(1);                                                                               \
        }                                                                                          \
        if ((status_ == KVFERRY_OK) != (kvferry_last_error_message()[0] == '\0')) {                \
            fprintf(stderr, "%s:%d: %s: message \"%s\" does not fit status %s\n", __FILE__,        \
                    __LINE__, #call, kvferry_last_error_message(), kvferry_status_name(status_));  \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define CHECK_OK(call) CHECK_STATUS(KVFERRY_OK, call)

/* The byte at `offset` of block `block` in a buffer filled with `seed`: both processes of a test
 * compute it, so neither needs the other's copy to check what arrived. */
static inline uint8_t pattern_byte(unsigned seed, size_t block, size_t offset) {
    uint64_t x = ((uint64_t)seed << 40) ^ ((uint64_t)block << 24) ^ (uint64_t)offset;
    x *= 0x9E3779B97F4A7C15ull;
    return (uint8_t)(x >> 56);
}

static inline void fill_block(uint8_t *block_start, size_t len, unsigned seed, size_t block) {
    for (size_t i = 0; i < len; i++) block_start[i] = pattern_byte(seed, block, i);
}

/* Whether a block holds block `block` of the `seed` pattern; prints the first difference. */
static inline int block_matches(const uint8_t *block_start, size_t len, unsigned seed, size_t block) {
    for (size_t i = 0; i < len; i++) {
        if (block_start[i] != pattern_byte(seed, block, i)) {
            fprintf(stderr, "byte %zu differs from block %zu of pattern %u: %u != %u\n", i, block, seed,
                    block_start[i], pattern_byte(seed, block, i));
            return 0;
        }
    }
    return 1;
}

#endif
