/* Offloading a prompt's KV blocks to the tier store and loading them back on a prefix hit, as a C
 * engine would: key the tokens, put the blocks, and later look the prefix up and get what is cached.
 *
 *   cc store.c $(pkg-config --cflags --libs kvferry) -o store && ./store */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvferry.h>

#define BLOCK_BYTES 4096 /* one KV block of all layers, say */
#define BLOCK_TOKENS 16
#define BLOCKS 4

static int fail(const char *what, kvferry_status status) {
    fprintf(stderr, "%s: %s (%s)\n", what, kvferry_last_error_message(), kvferry_status_name(status));
    return 1;
}
#define TRY(call)                                               \
    do {                                                        \
        kvferry_status status_ = (call);                        \
        if (status_ != KVFERRY_OK) return fail(#call, status_); \
    } while (0)

/* Put or get every block of `kv`, one region per block, and wait for it. */
static kvferry_status move(kvferry_store store, int get, const kvferry_block_key *keys, size_t n, uint8_t *kv) {
    kvferry_region regions[BLOCKS];
    for (size_t i = 0; i < n; i++)
        regions[i] = (kvferry_region){.addr = (uintptr_t)(kv + i * BLOCK_BYTES), .len = BLOCK_BYTES, .mem_kind = KVFERRY_MEM_HOST};
    kvferry_store_op op;
    kvferry_status status = get ? kvferry_store_get(store, keys, n, regions, 1, &op)
                                : kvferry_store_put(store, keys, n, regions, 1, &op);
    if (status != KVFERRY_OK) return status;
    status = kvferry_store_op_wait(op, 10000);
    kvferry_store_op_destroy(op); /* its outcome is in `status` */
    return status;
}

int main(void) {
    static uint8_t kv[BLOCKS * BLOCK_BYTES], loaded[BLOCKS * BLOCK_BYTES];
    for (size_t i = 0; i < sizeof kv; i++) kv[i] = (uint8_t)(i * 7);
    uint32_t tokens[BLOCKS * BLOCK_TOKENS + 5]; /* the last 5 tokens are a partial block: not cached */
    for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; i++) tokens[i] = (uint32_t)(1000 + i);

    const char *options[] = {"block_size=4096", "host_capacity=1048576"}; /* add disk.dir= and disk.capacity= for NVMe */
    kvferry_store store;
    TRY(kvferry_store_create(options, 2, &store));

    kvferry_block_key keys[BLOCKS];
    size_t n;
    TRY(kvferry_block_key_prefix(tokens, sizeof tokens / sizeof tokens[0], BLOCK_TOKENS, NULL, 0, keys, BLOCKS, &n));
    TRY(move(store, 0, keys, n, kv)); /* offload */

    /* Later, a request with the same prefix: how much is cached, and where? */
    kvferry_medium media[BLOCKS];
    size_t hit;
    TRY(kvferry_store_lookup(store, keys, n, media, BLOCKS, &hit));
    TRY(move(store, 1, keys, hit, loaded)); /* load the hit */
    const char *where = hit == 0 ? "-" : media[0] == KVFERRY_MEDIUM_CPU ? "DRAM" : "disk";
    printf("%zu of %zu blocks cached (first in %s), loaded %s\n", hit, n, where,
           memcmp(kv, loaded, hit * BLOCK_BYTES) == 0 ? "intact" : "CORRUPTED");
    TRY(kvferry_store_destroy(store));
    return hit == n && memcmp(kv, loaded, sizeof kv) == 0 ? 0 : 1;
}
