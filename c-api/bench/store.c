/* The tier store's DRAM tier driven from C: put and get throughput through kvferry_store_put /
 * _get in calls of 64 blocks, all in flight, next to a single-thread memcpy of the same blocks in the
 * same process (the limit), and the cost of one lookup call. Prints Markdown rows;
 * c-api/bench-store.sh runs it next to `kvferry bench tier`.
 *
 * Usage: store [MiB per pass] [passes]   (defaults 256 and 5; each row is the median pass) */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <kvferry.h>

#define TRY(call)                                                                                  \
    do {                                                                                           \
        kvferry_status status_ = (call);                                                           \
        if (status_ != KVFERRY_OK) {                                                               \
            fprintf(stderr, "%s: %s (%s)\n", #call, kvferry_last_error_message(),                  \
                    kvferry_status_name(status_));                                                 \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define CALL_BLOCKS 64
#define BLOCK_TOKENS 16
#define MAX_PASSES 15
#define LOOKUP_CALLS 20000

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *values, int n) {
    qsort(values, n, sizeof *values, by_value);
    return values[n / 2];
}

/* Put or get every block, CALL_BLOCKS per call, all calls in flight, then wait for them all. */
static double pass(kvferry_store store, int get, const kvferry_block_key *keys, kvferry_region *regions,
                   size_t blocks, kvferry_store_op *ops) {
    double t0 = now_s();
    size_t calls = 0;
    for (size_t first = 0; first < blocks; first += CALL_BLOCKS, calls++) {
        size_t n = blocks - first < CALL_BLOCKS ? blocks - first : CALL_BLOCKS;
        if (get) {
            TRY(kvferry_store_get(store, keys + first, n, regions + first, 1, &ops[calls]));
        } else {
            TRY(kvferry_store_put(store, keys + first, n, regions + first, 1, &ops[calls]));
        }
    }
    for (size_t i = 0; i < calls; i++) TRY(kvferry_store_op_wait(ops[i], 60000));
    double seconds = now_s() - t0;
    for (size_t i = 0; i < calls; i++) TRY(kvferry_store_op_destroy(ops[i]));
    return seconds;
}

static void bench(size_t block, size_t total, int passes) {
    size_t blocks = total / block;
    unsigned char *src = aligned_alloc(4096, total), *dst = aligned_alloc(4096, total);
    kvferry_block_key *keys = malloc(blocks * sizeof *keys);
    kvferry_region *src_regions = malloc(blocks * sizeof *src_regions);
    kvferry_region *dst_regions = malloc(blocks * sizeof *dst_regions);
    kvferry_store_op *ops = malloc((blocks / CALL_BLOCKS + 1) * sizeof *ops);
    uint32_t *tokens = malloc(blocks * BLOCK_TOKENS * sizeof *tokens);
    if (!src || !dst || !keys || !src_regions || !dst_regions || !ops || !tokens) exit(1);
    for (size_t i = 0; i < total; i++) src[i] = (unsigned char)(i * 131 + i / 4096);
    memset(dst, 0, total);
    for (size_t i = 0; i < blocks * BLOCK_TOKENS; i++) tokens[i] = (uint32_t)i;
    size_t n = 0;
    TRY(kvferry_block_key_prefix(tokens, blocks * BLOCK_TOKENS, BLOCK_TOKENS, NULL, 0, keys, blocks, &n));
    for (size_t b = 0; b < blocks; b++) {
        src_regions[b] = (kvferry_region){.addr = (uintptr_t)(src + b * block), .len = block, .mem_kind = KVFERRY_MEM_HOST};
        dst_regions[b] = (kvferry_region){.addr = (uintptr_t)(dst + b * block), .len = block, .mem_kind = KVFERRY_MEM_HOST};
    }

    char block_option[64], capacity_option[64];
    snprintf(block_option, sizeof block_option, "block_size=%zu", block);
    snprintf(capacity_option, sizeof capacity_option, "host_capacity=%zu", total);
    const char *options[] = {block_option, capacity_option};
    kvferry_store store;
    TRY(kvferry_store_create(options, 2, &store));

    double put_s[MAX_PASSES], get_s[MAX_PASSES], memcpy_s[MAX_PASSES];
    for (int p = -1; p < passes; p++) { /* pass -1 faults the arena and buffers in, untimed */
        TRY(kvferry_store_clear(store));
        double put = pass(store, 0, keys, src_regions, blocks, ops);
        double get = pass(store, 1, keys, dst_regions, blocks, ops);
        double t0 = now_s();
        for (size_t at = 0; at < total; at += block) memcpy(dst + at, src + at, block); /* as kvferry bench tier */
        double copy = now_s() - t0;
        if (p >= 0) put_s[p] = put, get_s[p] = get, memcpy_s[p] = copy;
    }
    /* Checked outside the timed passes: the last get left every block in dst. */
    memset(dst, 0, total);
    pass(store, 1, keys, dst_regions, blocks, ops);
    if (memcmp(src, dst, total) != 0) {
        fprintf(stderr, "a block came back different\n");
        exit(1);
    }

    kvferry_medium media[CALL_BLOCKS];
    double t0 = now_s(); /* main() keeps at least CALL_BLOCKS blocks per store */
    for (int i = 0; i < LOOKUP_CALLS; i++) TRY(kvferry_store_lookup(store, keys, CALL_BLOCKS, media, CALL_BLOCKS, &n));
    double lookup_us = (now_s() - t0) / LOOKUP_CALLS * 1e6;
    if (n != CALL_BLOCKS) exit(1);

    double gb = total / 1e9, limit = gb / median(memcpy_s, passes);
    double put = gb / median(put_s, passes), get = gb / median(get_s, passes);
    printf("| put | %zuK | %.2f | memcpy %.2f | %.0f%% | %.1f |\n", block >> 10, put, limit, 100 * put / limit, lookup_us);
    printf("| get | %zuK | %.2f | memcpy %.2f | %.0f%% | %.1f |\n", block >> 10, get, limit, 100 * get / limit, lookup_us);
    TRY(kvferry_store_destroy(store));
    free(src), free(dst), free(keys), free(src_regions), free(dst_regions), free(ops), free(tokens);
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
    int passes = argc > 2 ? atoi(argv[2]) : 5;
    if (mib < 64 || passes < 1 || passes > MAX_PASSES) {
        fprintf(stderr, "usage: %s [MiB per pass, at least 64] [passes, 1 to %d]\n", argv[0], MAX_PASSES);
        return 2;
    }
    printf("| op | block | C ABI GB/s | limit GB/s | %% of limit | lookup of %d keys µs |\n", CALL_BLOCKS);
    printf("|---|---|---|---|---|---|\n");
    bench(64 << 10, mib << 20, passes);
    bench(1 << 20, mib << 20, passes);
    return 0;
}
