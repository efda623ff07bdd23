/* The tier store through the C ABI, as an engine uses it: key a token sequence, put its blocks,
 * look the prefix up, get the blocks back byte-exact from DRAM and from disk (the DRAM tier holds
 * half of them), reopen the directory after a restart, watch the events, share blocks with a
 * second store through a remote tier in a shared directory, and every error path of the store
 * functions. Run under valgrind by the test script too, so destroying a store or an
 * operation still copying caller memory must leave no invalid access behind. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define BLOCK 4096
#define HOST_BLOCKS 4
#define BLOCKS 8
#define BLOCK_TOKENS 16
#define TOKENS (BLOCKS * BLOCK_TOKENS)
#define WAIT_MS 30000
#define SEED 5

static char dir[64];
static char disk_option[128];

static kvferry_store open_store(void) {
    const char *options[] = {"block_size=4096", "host_capacity=16384", disk_option, "disk.capacity=65536",
                             "disk.admit_after=0", "events=on", "policy=lru"};
    kvferry_store store = {0};
    CHECK_OK(kvferry_store_create(options, sizeof options / sizeof options[0], &store));
    CHECK(store.id != 0);
    return store;
}

static void block_regions(uint8_t *buf, size_t first, size_t count, size_t per_block, kvferry_region *regions) {
    size_t part = BLOCK / per_block;
    for (size_t b = 0; b < count; b++) {
        for (size_t p = 0; p < per_block; p++) {
            uint8_t *addr = buf + (first + b) * BLOCK + p * part;
            regions[b * per_block + p] =
                (kvferry_region){.addr = (uintptr_t)addr, .len = part, .mem_kind = KVFERRY_MEM_HOST};
        }
    }
}

static void finish(kvferry_store_op op) {
    CHECK_OK(kvferry_store_op_wait(op, WAIT_MS));
    bool done = false;
    CHECK_OK(kvferry_store_op_poll(op, &done));
    CHECK(done);
    CHECK_OK(kvferry_store_op_destroy(op));
}

/* Put or get blocks [first, first + count) of `buf`, split in `per_block` regions each. */
static void put(kvferry_store store, const kvferry_block_key *keys, uint8_t *buf, size_t first, size_t count,
                size_t per_block) {
    kvferry_region regions[BLOCKS * 2];
    block_regions(buf, first, count, per_block, regions);
    kvferry_store_op op = {0};
    CHECK_OK(kvferry_store_put(store, keys + first, count, regions, per_block, &op));
    finish(op);
}

static void get(kvferry_store store, const kvferry_block_key *keys, uint8_t *buf, size_t first, size_t count) {
    kvferry_region regions[BLOCKS];
    block_regions(buf, first, count, 1, regions);
    kvferry_store_op op = {0};
    CHECK_OK(kvferry_store_get(store, keys + first, count, regions, 1, &op));
    finish(op);
}

static bool same_key(const kvferry_block_key *a, const kvferry_block_key *b) {
    return a->len == b->len && memcmp(a->bytes, b->bytes, a->len) == 0;
}

/* Drain every queued event, three at a time (so partial drains are exercised). */
static size_t drain(kvferry_store store, kvferry_store_event *events, size_t capacity) {
    size_t total = 0;
    for (;;) {
        size_t n = 0;
        CHECK(total + 3 <= capacity);
        CHECK_OK(kvferry_store_events_take(store, events + total, 3, &n));
        CHECK(n <= 3);
        total += n;
        if (n < 3) return total;
    }
}

/* Whether `events` hold one of `kind` for `key`, into `medium` (and from `from`). */
static bool has_event(const kvferry_store_event *events, size_t n, kvferry_store_event_kind kind,
                      kvferry_medium medium, kvferry_medium from, const kvferry_block_key *key) {
    for (size_t i = 0; i < n; i++) {
        if (events[i].kind == kind && events[i].medium == medium && events[i].from == from &&
            same_key(&events[i].key, key))
            return true;
    }
    return false;
}

static void keys_for(kvferry_block_key keys[BLOCKS]) {
    uint32_t tokens[TOKENS];
    for (size_t i = 0; i < TOKENS; i++) tokens[i] = (uint32_t)(i * 7 + 3);
    const uint8_t lora[] = {'l', 'o', 'r', 'a'};
    size_t n = 0;
    CHECK_OK(kvferry_block_key_prefix(tokens, TOKENS, BLOCK_TOKENS, lora, sizeof lora, keys, BLOCKS, &n));
    CHECK(n == BLOCKS);
    /* The prefix keys are the chain, block by block, and depend on the extra bytes. */
    kvferry_block_key key;
    CHECK_OK(kvferry_block_key_chain(NULL, tokens, BLOCK_TOKENS, lora, sizeof lora, &key));
    CHECK(same_key(&key, &keys[0]) && key.len == 16);
    CHECK_OK(kvferry_block_key_chain(&keys[2], tokens + 3 * BLOCK_TOKENS, BLOCK_TOKENS, lora, sizeof lora, &key));
    CHECK(same_key(&key, &keys[3]));
    CHECK_OK(kvferry_block_key_chain(&keys[2], tokens + 3 * BLOCK_TOKENS, BLOCK_TOKENS, NULL, 0, &key));
    CHECK(!same_key(&key, &keys[3]));
    /* A partial trailing block has no key; a short array gets the count it needs. */
    kvferry_block_key few[BLOCKS];
    CHECK_OK(kvferry_block_key_prefix(tokens, TOKENS - 1, BLOCK_TOKENS, lora, sizeof lora, few, BLOCKS, &n));
    CHECK(n == BLOCKS - 1 && same_key(&few[6], &keys[6]));
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL,
                 kvferry_block_key_prefix(tokens, TOKENS, BLOCK_TOKENS, lora, sizeof lora, few, 3, &n));
    CHECK(n == BLOCKS);
    /* Engine hashes are kept verbatim. */
    uint8_t sha[32];
    for (size_t i = 0; i < sizeof sha; i++) sha[i] = (uint8_t)(i * 13);
    CHECK_OK(kvferry_block_key_from_hash(sha, sizeof sha, &key));
    CHECK(key.len == 32 && memcmp(key.bytes, sha, 32) == 0);
}

/* Half the blocks fit in DRAM: the rest are written to disk and come back from there. */
static void tiers(kvferry_store store, const kvferry_block_key *keys, uint8_t *src, uint8_t *dst) {
    for (size_t b = 0; b < BLOCKS; b++) fill_block(src + b * BLOCK, BLOCK, SEED, b);
    put(store, keys, src, 0, HOST_BLOCKS, 2); /* two regions per block: halves gathered into one */
    put(store, keys, src, HOST_BLOCKS, BLOCKS - HOST_BLOCKS, 1);

    kvferry_medium media[BLOCKS];
    size_t found = 0;
    CHECK_OK(kvferry_store_lookup(store, keys, BLOCKS, media, BLOCKS, &found));
    CHECK(found == BLOCKS);
    for (size_t b = 0; b < BLOCKS; b++) CHECK(media[b] == (b < HOST_BLOCKS ? KVFERRY_MEDIUM_DISK : KVFERRY_MEDIUM_CPU));
    kvferry_store_stats stats;
    CHECK_OK(kvferry_store_stats_get(store, &stats));
    CHECK(stats.block_size == BLOCK && stats.host_capacity_blocks == HOST_BLOCKS);
    CHECK(stats.host_blocks == HOST_BLOCKS && stats.disk_blocks == HOST_BLOCKS && stats.disk_writes == HOST_BLOCKS);
    CHECK(stats.disk_capacity_blocks == 16 && !stats.disk_failed);

    kvferry_store_event events[64];
    size_t n = drain(store, events, 64);
    for (size_t b = 0; b < BLOCKS; b++) {
        CHECK(has_event(events, n, KVFERRY_STORE_EVENT_STORED, KVFERRY_MEDIUM_CPU, KVFERRY_MEDIUM_NONE, &keys[b]));
        bool moved = has_event(events, n, KVFERRY_STORE_EVENT_MOVED, KVFERRY_MEDIUM_DISK, KVFERRY_MEDIUM_CPU, &keys[b]);
        CHECK(moved == (b < HOST_BLOCKS));
    }

    /* The disk half comes back byte-exact, promoted to DRAM; the DRAM half goes down to disk. */
    memset(dst, 0, (size_t)BLOCKS * BLOCK);
    get(store, keys, dst, 0, HOST_BLOCKS);
    for (size_t b = 0; b < HOST_BLOCKS; b++) CHECK(block_matches(dst + b * BLOCK, BLOCK, SEED, b));
    CHECK_OK(kvferry_store_stats_get(store, &stats));
    CHECK(stats.disk_hits == HOST_BLOCKS);
    n = drain(store, events, 64);
    for (size_t b = 0; b < BLOCKS; b++) {
        if (b < HOST_BLOCKS) {
            CHECK(has_event(events, n, KVFERRY_STORE_EVENT_STORED, KVFERRY_MEDIUM_CPU, KVFERRY_MEDIUM_NONE, &keys[b]));
        } else {
            CHECK(has_event(events, n, KVFERRY_STORE_EVENT_MOVED, KVFERRY_MEDIUM_DISK, KVFERRY_MEDIUM_CPU, &keys[b]));
        }
    }
    CHECK_OK(kvferry_store_lookup(store, keys, BLOCKS, media, BLOCKS, &found));
    CHECK(found == BLOCKS && media[0] == KVFERRY_MEDIUM_CPU && media[BLOCKS - 1] == KVFERRY_MEDIUM_DISK);

    /* A prefix stops at the first block missing. */
    kvferry_block_key gap[3] = {keys[0], keys[1], keys[1]};
    gap[1].bytes[0] ^= 1;
    CHECK_OK(kvferry_store_lookup(store, gap, 3, media, 3, &found));
    CHECK(found == 1);

    /* Offload moves the DRAM blocks down, so the whole sequence is on disk for the restart. */
    kvferry_store_op op = {0};
    CHECK_OK(kvferry_store_offload(store, keys, BLOCKS, &op));
    finish(op);
    CHECK_OK(kvferry_store_stats_get(store, &stats));
    CHECK(stats.host_blocks == 0 && stats.disk_blocks == BLOCKS);
}

static void restart(const kvferry_block_key *keys, uint8_t *dst) {
    kvferry_store store = open_store();
    kvferry_medium media[BLOCKS];
    size_t found = 0;
    /* The replayed index lists every block: too small an array says how many. */
    kvferry_block_key listed[BLOCKS];
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_store_disk_keys(store, listed, 1, &found));
    CHECK(found == BLOCKS);
    CHECK_OK(kvferry_store_disk_keys(store, listed, BLOCKS, &found));
    CHECK(found == BLOCKS);
    for (size_t b = 0; b < BLOCKS; b++) {
        bool known = false;
        for (size_t k = 0; k < BLOCKS; k++)
            known |= listed[b].len == keys[k].len && memcmp(listed[b].bytes, keys[k].bytes, keys[k].len) == 0;
        CHECK(known);
    }
    CHECK_OK(kvferry_store_lookup(store, keys, BLOCKS, media, BLOCKS, &found));
    CHECK(found == BLOCKS);
    for (size_t b = 0; b < BLOCKS; b++) CHECK(media[b] == KVFERRY_MEDIUM_DISK);
    memset(dst, 0, (size_t)BLOCKS * BLOCK);
    get(store, keys, dst, HOST_BLOCKS, BLOCKS - HOST_BLOCKS);
    for (size_t b = HOST_BLOCKS; b < BLOCKS; b++) CHECK(block_matches(dst + b * BLOCK, BLOCK, SEED, b));

    /* Clearing empties both tiers, announces it, and lasts across the next restart. */
    kvferry_store_event events[64];
    drain(store, events, 64);
    CHECK_OK(kvferry_store_clear(store));
    size_t n = drain(store, events, 64);
    CHECK(has_event(events, n, KVFERRY_STORE_EVENT_REMOVED, KVFERRY_MEDIUM_DISK, KVFERRY_MEDIUM_NONE, &keys[0]));
    CHECK(has_event(events, n, KVFERRY_STORE_EVENT_REMOVED, KVFERRY_MEDIUM_CPU, KVFERRY_MEDIUM_NONE,
                    &keys[HOST_BLOCKS]));
    /* Then that nothing is left, as the last event. */
    CHECK(n > 0 && events[n - 1].kind == KVFERRY_STORE_EVENT_CLEARED && events[n - 1].key.len == 0 &&
          events[n - 1].medium == KVFERRY_MEDIUM_NONE);
    CHECK_OK(kvferry_store_lookup(store, keys, BLOCKS, media, BLOCKS, &found));
    CHECK(found == 0);
    CHECK_OK(kvferry_store_destroy(store));

    store = open_store();
    CHECK_OK(kvferry_store_lookup(store, keys, BLOCKS, media, 0, &found));
    CHECK(found == 0);
    CHECK_OK(kvferry_store_disk_keys(store, NULL, 0, &found));
    CHECK(found == 0);
    CHECK_OK(kvferry_store_destroy(store));
}

static double seconds_now(void) {
    struct timespec now;
    CHECK(clock_gettime(CLOCK_MONOTONIC, &now) == 0);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* Look `keys` up through the remote tier, polling (at most WAIT_MS) while the remote is asked. The
 * first call must find it not asked yet when `expect_pending`. */
static size_t lookup_remote_settled(kvferry_store store, const kvferry_block_key *keys, kvferry_medium *media,
                                    bool expect_pending) {
    size_t found = 99;
    bool pending = false;
    CHECK_OK(kvferry_store_lookup_remote(store, keys, BLOCKS, media, BLOCKS, &found, &pending));
    if (expect_pending) CHECK(pending && found == 0);
    double give_up = seconds_now() + WAIT_MS / 1000.0;
    struct timespec pause = {.tv_nsec = 1000 * 1000};
    while (pending) {
        CHECK(seconds_now() < give_up);
        nanosleep(&pause, NULL);
        CHECK_OK(kvferry_store_lookup_remote(store, keys, BLOCKS, media, BLOCKS, &found, &pending));
    }
    return found;
}

/* One store puts blocks and flushes them to a remote tier in a shared directory; a second store on
 * the same directory and namespace, with an empty DRAM tier, finds them there and reads them back
 * byte-exact; a store of another namespace sees none of them. */
static void remote_tier(const kvferry_block_key *keys, uint8_t *src, uint8_t *dst) {
    char path_option[128];
    snprintf(path_option, sizeof path_option, "remote.path=%s/remote", dir);
    const char *options[] = {"block_size=4096",        "host_capacity=32768",     path_option,
                             "remote.concurrency=4",   "remote.timeout_ms=10000", "remote.max_upload_bytes=1048576",
                             "remote.namespace=model-a/bf16/16/rank0"};
    const size_t option_count = sizeof options / sizeof options[0];
    kvferry_store writer = {0}, reader = {0}, other = {0};
    CHECK_OK(kvferry_store_create(options, option_count, &writer));
    kvferry_store_stats stats;
    CHECK_OK(kvferry_store_stats_get(writer, &stats));
    CHECK(stats.remote_enabled && !stats.remote_breaker_open && stats.remote_uploads == 0);

    for (size_t b = 0; b < BLOCKS; b++) fill_block(src + b * BLOCK, BLOCK, SEED + 2, b);
    put(writer, keys, src, 0, BLOCKS, 2);
    bool done = false;
    CHECK_OK(kvferry_store_remote_flush(writer, WAIT_MS, &done));
    CHECK(done);
    CHECK_OK(kvferry_store_stats_get(writer, &stats));
    CHECK(stats.remote_uploads == BLOCKS && stats.remote_upload_bytes == (uint64_t)BLOCKS * BLOCK);
    CHECK(stats.remote_upload_bytes_pending == 0 && stats.remote_dropped == 0 && stats.remote_errors == 0);

    CHECK_OK(kvferry_store_create(options, option_count, &reader));
    kvferry_medium media[BLOCKS];
    size_t found = 99;
    CHECK_OK(kvferry_store_lookup(reader, keys, BLOCKS, media, BLOCKS, &found));
    CHECK(found == 0); /* nothing local: only the remote has them */
    CHECK(lookup_remote_settled(reader, keys, media, true) == BLOCKS);
    for (size_t b = 0; b < BLOCKS; b++) CHECK(media[b] == KVFERRY_MEDIUM_REMOTE);

    memset(dst, 0, (size_t)BLOCKS * BLOCK);
    get(reader, keys, dst, 0, BLOCKS);
    for (size_t b = 0; b < BLOCKS; b++) CHECK(block_matches(dst + b * BLOCK, BLOCK, SEED + 2, b));
    CHECK_OK(kvferry_store_stats_get(reader, &stats));
    CHECK(stats.remote_enabled && stats.remote_hits == BLOCKS && stats.remote_uploads == 0);
    CHECK(stats.remote_corrupt == 0 && stats.remote_mismatched == 0 && stats.host_blocks == BLOCKS);
    /* Read into DRAM, the blocks are local now: found without asking the remote, pending or not. */
    bool pending = true;
    CHECK_OK(kvferry_store_lookup_remote(reader, keys, BLOCKS, media, BLOCKS, &found, &pending));
    CHECK(!pending && found == BLOCKS && media[0] == KVFERRY_MEDIUM_CPU && media[BLOCKS - 1] == KVFERRY_MEDIUM_CPU);
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_store_lookup_remote(reader, keys, BLOCKS, media, 1, &found,
                                                                           &pending));
    CHECK(!pending && found == BLOCKS);

    /* Another namespace shares the directory, not the blocks. */
    options[option_count - 1] = "remote.namespace=model-b/bf16/16/rank0";
    CHECK_OK(kvferry_store_create(options, option_count, &other));
    CHECK(lookup_remote_settled(other, keys, media, true) == 0);
    CHECK_OK(kvferry_store_stats_get(other, &stats));
    CHECK(stats.remote_misses >= 1 && stats.remote_hits == 0);

    CHECK_OK(kvferry_store_destroy(other));
    CHECK_OK(kvferry_store_destroy(reader));
    CHECK_OK(kvferry_store_destroy(writer));
}

/* The remote tier's options and functions refuse what is wrong with a typed error and write no
 * output; without a remote tier its functions answer for the local tiers. */
static void remote_errors(const kvferry_block_key *keys) {
    char path_option[128];
    snprintf(path_option, sizeof path_option, "remote.path=%s/remote", dir);
    kvferry_store store = {0};
    const char *no_namespace[] = {"block_size=4096", "host_capacity=16384", path_option};
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_create(no_namespace, 3, &store));
    CHECK(strstr(kvferry_last_error_message(), "remote.namespace") != NULL);
    const char *no_location[] = {"block_size=4096", "host_capacity=16384", "remote.namespace=ns"};
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_create(no_location, 3, &store));
    const char *zero_timeout[] = {"block_size=4096", "host_capacity=16384", path_option, "remote.namespace=ns",
                                  "remote.timeout_ms=0"};
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_create(zero_timeout, 5, &store));
    CHECK(strstr(kvferry_last_error_message(), "remote.timeout_ms") != NULL);
    const char *bad_scheme[] = {"block_size=4096", "host_capacity=16384", "remote.url=ftp://host/kv",
                                "remote.namespace=ns"};
    CHECK_STATUS(KVFERRY_ERR_TIER_CONFIG, kvferry_store_create(bad_scheme, 4, &store));
    CHECK(strstr(kvferry_last_error_message(), "ftp") != NULL);
    const char *bad_setting[] = {"block_size=4096", "host_capacity=16384", "remote.url=s3://kv/prefix",
                                 "remote.namespace=ns", "remote.option.aws_no_such_setting=1"};
    CHECK_STATUS(KVFERRY_ERR_TIER_CONFIG, kvferry_store_create(bad_setting, 5, &store));
    CHECK(strstr(kvferry_last_error_message(), "aws_no_such_setting") != NULL);
    const char *setting_for_directory[] = {"block_size=4096", "host_capacity=16384", path_option,
                                           "remote.namespace=ns", "remote.option.aws_region=x"};
    CHECK_STATUS(KVFERRY_ERR_TIER_CONFIG, kvferry_store_create(setting_for_directory, 5, &store));
    CHECK(store.id == 0);

    const char *remote[] = {"block_size=4096", "host_capacity=16384", path_option, "remote.namespace=ns"};
    CHECK_OK(kvferry_store_create(remote, 4, &store));
    kvferry_medium media[BLOCKS];
    size_t found = 99;
    bool pending = true, done = false;
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_store_lookup_remote(store, keys, BLOCKS, media, BLOCKS, &found, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_store_lookup_remote(store, keys, BLOCKS, media, BLOCKS, NULL, &pending));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_store_lookup_remote(store, keys, BLOCKS, NULL, BLOCKS, &found, &pending));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_store_lookup_remote(store, NULL, 2, media, BLOCKS, &found, &pending));
    kvferry_block_key bad_keys[2] = {keys[0], keys[1]};
    bad_keys[1].len = 0;
    CHECK_STATUS(KVFERRY_ERR_TIER_BAD_KEY,
                 kvferry_store_lookup_remote(store, bad_keys, 2, media, 2, &found, &pending));
    CHECK(strstr(kvferry_last_error_message(), "keys[1]") != NULL);
    CHECK(found == 99 && pending); /* no failed call wrote its outputs */
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_remote_flush(store, 0, NULL));
    CHECK_OK(kvferry_store_remote_flush(store, 0, &done));
    CHECK(done); /* nothing was put */
    CHECK_OK(kvferry_store_destroy(store));

    kvferry_store never = {0}, forged = {0x7fffffffffffull};
    kvferry_store handles[] = {never, forged, store};
    for (size_t i = 0; i < 3; i++) {
        CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE,
                     kvferry_store_lookup_remote(handles[i], keys, BLOCKS, media, BLOCKS, &found, &pending));
        CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_remote_flush(handles[i], 0, &done));
    }

    /* Without a remote tier: the local lookup, never pending, and nothing to flush. */
    const char *local[] = {"block_size=4096", "host_capacity=16384"};
    CHECK_OK(kvferry_store_create(local, 2, &store));
    CHECK_OK(kvferry_store_lookup_remote(store, keys, BLOCKS, media, BLOCKS, &found, &pending));
    CHECK(found == 0 && !pending);
    done = false;
    CHECK_OK(kvferry_store_remote_flush(store, 0, &done));
    CHECK(done);
    kvferry_store_stats stats;
    CHECK_OK(kvferry_store_stats_get(store, &stats));
    CHECK(!stats.remote_enabled && !stats.remote_breaker_open && stats.remote_uploads == 0);
    CHECK_OK(kvferry_store_destroy(store));
    CHECK(strcmp(kvferry_status_name(KVFERRY_ERR_TIER_REMOTE_UNAVAILABLE), "KVFERRY_ERR_TIER_REMOTE_UNAVAILABLE") == 0);
    CHECK(strcmp(kvferry_status_name(KVFERRY_ERR_TIER_REMOTE_MISMATCH), "KVFERRY_ERR_TIER_REMOTE_MISMATCH") == 0);
}

static void creation_errors(void) {
    kvferry_store store = {0};
    const char *base[] = {"block_size=4096", "host_capacity=16384"};
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_create(base, 2, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_create(NULL, 2, &store));
    const char *null_option[] = {"block_size=4096", NULL};
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_create(null_option, 2, &store));
    CHECK(strstr(kvferry_last_error_message(), "options[1]") != NULL);
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_create(NULL, 0, &store));
    CHECK(strstr(kvferry_last_error_message(), "block_size") != NULL);
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_create(base, 1, &store));
    CHECK(strstr(kvferry_last_error_message(), "host_capacity") != NULL);

    const char *bad[][3] = {
        {"block_size=4096", "host_capacity=16384", "colour=blue"},
        {"block_size=4096", "host_capacity=16384", "policy=fifo"},
        {"block_size=0", "host_capacity=16384", "policy=arc"},
        {"block_size=4k", "host_capacity=16384", "policy=arc"},
        {"block_size=4096", "host_capacity=16384", "no-equals-sign"},
        {"block_size=4096", "host_capacity=16384", "events=maybe"},
        {"block_size=4096", "host_capacity=16384", "workers=0"},
        {"block_size=4096", "host_capacity=16384", "disk.admit_after=256"},
        {"block_size=4096", "host_capacity=16384", "disk.dir=/tmp"},        /* no capacity */
        {"block_size=4096", "host_capacity=16384", "disk.capacity=65536"}, /* no directory */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_create(bad[i], 3, &store));
    }
    /* What the store itself refuses: no block fits, O_DIRECT needs 4 KiB multiples, a directory
     * that cannot be created. */
    const char *tiny[] = {"block_size=4096", "host_capacity=4095"};
    CHECK_STATUS(KVFERRY_ERR_TIER_CONFIG, kvferry_store_create(tiny, 2, &store));
    const char *unaligned[] = {"block_size=1000", "host_capacity=16000", disk_option, "disk.capacity=64000"};
    CHECK_STATUS(KVFERRY_ERR_TIER_CONFIG, kvferry_store_create(unaligned, 4, &store));
    char file[96], under_file[128];
    snprintf(file, sizeof file, "%s/a-file", dir);
    FILE *f = fopen(file, "w");
    CHECK(f != NULL);
    fclose(f);
    snprintf(under_file, sizeof under_file, "disk.dir=%s/sub", file);
    const char *unusable[] = {"block_size=4096", "host_capacity=16384", under_file, "disk.capacity=65536"};
    CHECK_STATUS(KVFERRY_ERR_TIER_DISK_UNAVAILABLE, kvferry_store_create(unusable, 4, &store));
    CHECK(strstr(kvferry_last_error_message(), "a-file") != NULL);
    CHECK(unlink(file) == 0);
    CHECK(store.id == 0); /* no failed call wrote its output */
    CHECK(strcmp(kvferry_status_name(KVFERRY_ERR_TIER_NOT_CACHED), "KVFERRY_ERR_TIER_NOT_CACHED") == 0);
}

static void key_errors(void) {
    kvferry_block_key key = {0}, keys[2];
    uint8_t long_hash[33] = {0};
    uint32_t tokens[4] = {1, 2, 3, 4};
    size_t n = 0;
    CHECK_STATUS(KVFERRY_ERR_TIER_BAD_KEY, kvferry_block_key_from_hash(long_hash, 0, &key));
    CHECK_STATUS(KVFERRY_ERR_TIER_BAD_KEY, kvferry_block_key_from_hash(long_hash, sizeof long_hash, &key));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_block_key_from_hash(NULL, 8, &key));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_block_key_from_hash(long_hash, 8, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_block_key_chain(NULL, NULL, 4, NULL, 0, &key));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_block_key_chain(NULL, tokens, 4, NULL, 3, &key));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_block_key_chain(NULL, tokens, 4, NULL, 0, NULL));
    kvferry_block_key empty_parent = {0};
    CHECK_STATUS(KVFERRY_ERR_TIER_BAD_KEY, kvferry_block_key_chain(&empty_parent, tokens, 4, NULL, 0, &key));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_block_key_prefix(tokens, 4, 0, NULL, 0, keys, 2, &n));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_block_key_prefix(tokens, 4, 2, NULL, 0, NULL, 2, &n));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_block_key_prefix(tokens, 4, 2, NULL, 0, keys, 2, NULL));
}

static void operation_errors(kvferry_store store, const kvferry_block_key *keys, uint8_t *buf) {
    kvferry_region regions[BLOCKS];
    block_regions(buf, 0, BLOCKS, 1, regions);
    kvferry_store_op op = {0};
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_put(store, NULL, 1, regions, 1, &op));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_put(store, keys, 1, NULL, 1, &op));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_put(store, keys, 1, regions, 1, NULL));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_put(store, keys, 1, regions, 0, &op));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_put(store, keys, SIZE_MAX, regions, 2, &op));
    /* A key of no bytes or too many, named by its index. */
    kvferry_block_key bad_keys[2] = {keys[0], keys[1]};
    bad_keys[1].len = 0;
    CHECK_STATUS(KVFERRY_ERR_TIER_BAD_KEY, kvferry_store_put(store, bad_keys, 2, regions, 1, &op));
    CHECK(strstr(kvferry_last_error_message(), "keys[1]") != NULL);
    bad_keys[1].len = KVFERRY_BLOCK_KEY_MAX_BYTES + 1;
    CHECK_STATUS(KVFERRY_ERR_TIER_BAD_KEY, kvferry_store_get(store, bad_keys, 2, regions, 1, &op));
    /* Regions that do not add up to the block size; memory the store cannot copy. */
    kvferry_region odd[2] = {regions[0], regions[1]};
    odd[1].len = BLOCK - 1;
    CHECK_STATUS(KVFERRY_ERR_TIER_BAD_BLOCK, kvferry_store_put(store, keys, 2, odd, 1, &op));
    CHECK(strstr(kvferry_last_error_message(), "block 1") != NULL);
    odd[1] = regions[1];
    odd[1].mem_kind = KVFERRY_MEM_CUDA;
    CHECK_STATUS(KVFERRY_ERR_UNSUPPORTED, kvferry_store_get(store, keys, 2, odd, 1, &op));
    odd[1].mem_kind = 9;
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_put(store, keys, 2, odd, 1, &op));
    CHECK(op.id == 0);

    /* A get of a block never stored fails in the operation, naming it; the destination is untouched. */
    kvferry_block_key missing;
    const uint8_t hash[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    CHECK_OK(kvferry_block_key_from_hash(hash, sizeof hash, &missing));
    memset(buf, 0xAB, BLOCK);
    CHECK_OK(kvferry_store_get(store, &missing, 1, regions, 1, &op));
    CHECK_STATUS(KVFERRY_ERR_TIER_NOT_CACHED, kvferry_store_op_wait(op, WAIT_MS));
    bool done = false;
    CHECK_STATUS(KVFERRY_ERR_TIER_NOT_CACHED, kvferry_store_op_poll(op, &done));
    CHECK(done && buf[0] == 0xAB && buf[BLOCK - 1] == 0xAB);
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_op_poll(op, NULL));
    CHECK_OK(kvferry_store_op_destroy(op));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_op_destroy(op));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_op_wait(op, 0));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_op_poll(op, &done));

    /* A batch larger than the DRAM tier fails in the operation: it needs DRAM for all its blocks. */
    for (size_t b = 0; b < BLOCKS; b++) fill_block(buf + b * BLOCK, BLOCK, SEED + 1, b);
    CHECK_OK(kvferry_store_put(store, keys, BLOCKS, regions, 1, &op));
    CHECK_STATUS(KVFERRY_ERR_TIER_NO_ROOM, kvferry_store_op_wait(op, WAIT_MS));
    CHECK_OK(kvferry_store_op_destroy(op));

    /* Lookup and drain outputs. */
    kvferry_medium media[BLOCKS];
    size_t found = 0;
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_lookup(store, keys, BLOCKS, NULL, BLOCKS, &found));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_lookup(store, keys, BLOCKS, media, BLOCKS, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_lookup(store, NULL, 2, media, BLOCKS, &found));
    CHECK_STATUS(KVFERRY_ERR_TIER_BAD_KEY, kvferry_store_lookup(store, bad_keys, 2, media, BLOCKS, &found));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_events_take(store, NULL, 4, &found));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_events_take(store, NULL, 0, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_stats_get(store, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_offload(store, NULL, 1, &op));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_store_offload(store, keys, 1, NULL));
}

static void lookup_too_small(kvferry_store store, const kvferry_block_key *keys, uint8_t *buf) {
    put(store, keys, buf, 0, 2, 1);
    kvferry_medium media[BLOCKS];
    size_t found = 0;
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_store_lookup(store, keys, BLOCKS, media, 1, &found));
    CHECK(found == 2);
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_store_lookup(store, keys, BLOCKS, NULL, 0, &found));
    CHECK(found == 2);
    CHECK_OK(kvferry_store_lookup(store, keys, BLOCKS, media, 2, &found));
    CHECK(found == 2 && media[0] == KVFERRY_MEDIUM_CPU);
}

static void handle_errors(kvferry_store store, const kvferry_block_key *keys) {
    kvferry_store never = {0}, forged = {0x7fffffffffffull};
    kvferry_store_op op = {0};
    kvferry_medium media[1];
    kvferry_store_event events[1];
    kvferry_store_stats stats;
    size_t n = 0;
    kvferry_store handles[] = {never, forged};
    for (size_t i = 0; i < 2; i++) {
        kvferry_store h = handles[i];
        CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_lookup(h, keys, 1, media, 1, &n));
        CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_clear(h));
        CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_stats_get(h, &stats));
        CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_events_take(h, events, 1, &n));
        CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_offload(h, keys, 1, &op));
        CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_destroy(h));
    }
    /* An operation's id is not a store, nor a store's id an operation. */
    CHECK_OK(kvferry_store_offload(store, keys, 1, &op));
    kvferry_store mistyped = {op.id};
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_clear(mistyped));
    kvferry_store_op store_as_op = {store.id};
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_op_destroy(store_as_op));
    CHECK_OK(kvferry_store_op_destroy(op));
    /* A store without events=on has nothing to drain. */
    const char *quiet[] = {"block_size=4096", "host_capacity=16384"};
    kvferry_store plain = {0};
    CHECK_OK(kvferry_store_create(quiet, 2, &plain));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_store_events_take(plain, events, 1, &n));
    CHECK(strstr(kvferry_last_error_message(), "events=on") != NULL);
    CHECK_OK(kvferry_store_destroy(plain));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_destroy(plain));
}

/* Destroying a store, or an operation, while copies of caller memory are queued waits for them:
 * the caller frees the memory right after, and valgrind would see a late access. */
static void destroy_with_pending_ops(const kvferry_block_key *keys) {
    const char *options[] = {"block_size=4096", "host_capacity=65536", "workers=1"};
    for (int round = 0; round < 2; round++) {
        kvferry_store store = {0};
        CHECK_OK(kvferry_store_create(options, 3, &store));
        uint8_t *buf = malloc((size_t)BLOCKS * BLOCK);
        CHECK(buf != NULL);
        for (size_t b = 0; b < BLOCKS; b++) fill_block(buf + b * BLOCK, BLOCK, SEED, b);
        kvferry_region regions[BLOCKS];
        block_regions(buf, 0, BLOCKS, 1, regions);
        kvferry_store_op ops[BLOCKS];
        for (size_t b = 0; b < BLOCKS; b++) CHECK_OK(kvferry_store_put(store, keys + b, 1, regions + b, 1, &ops[b]));
        if (round == 0) {
            for (size_t b = 0; b < BLOCKS; b++) CHECK_OK(kvferry_store_op_destroy(ops[b]));
        }
        CHECK_OK(kvferry_store_destroy(store));
        free(buf);
        for (size_t b = 0; b < BLOCKS; b++) CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_op_destroy(ops[b]));
    }
}

/* Threads putting and getting through one store while the main thread destroys it: each call
 * succeeds or fails with KVFERRY_ERR_INVALID_HANDLE, and once destroy has returned no operation
 * touches the buffers, which are freed straight away (valgrind checks). */
struct worker {
    kvferry_store store;
    const kvferry_block_key *keys;
    uint8_t *buf;
    int refused;
};

static void *put_and_get(void *arg) {
    struct worker *w = arg;
    kvferry_region regions[HOST_BLOCKS];
    block_regions(w->buf, 0, HOST_BLOCKS, 1, regions);
    for (unsigned round = 0; !w->refused; round++) {
        kvferry_store_op op = {0};
        kvferry_status status = round % 2 ? kvferry_store_get(w->store, w->keys, HOST_BLOCKS, regions, 1, &op)
                                          : kvferry_store_put(w->store, w->keys, HOST_BLOCKS, regions, 1, &op);
        if (status == KVFERRY_ERR_INVALID_HANDLE) {
            w->refused = 1;
            break;
        }
        CHECK_OK(status);
        /* The store may be destroyed between the post and the wait: the operation goes with it. */
        status = kvferry_store_op_wait(op, WAIT_MS);
        CHECK(status == KVFERRY_OK || status == KVFERRY_ERR_INVALID_HANDLE);
        status = kvferry_store_op_destroy(op);
        CHECK(status == KVFERRY_OK || status == KVFERRY_ERR_INVALID_HANDLE);
    }
    return NULL;
}

static void destroy_under_threads(const kvferry_block_key *keys) {
    const char *options[] = {"block_size=4096", "host_capacity=65536"};
    kvferry_store store = {0};
    CHECK_OK(kvferry_store_create(options, 2, &store));
    struct worker workers[2];
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) {
        workers[i] = (struct worker){.store = store, .keys = keys + i * HOST_BLOCKS, .buf = malloc(HOST_BLOCKS * BLOCK)};
        CHECK(workers[i].buf != NULL);
        for (size_t b = 0; b < HOST_BLOCKS; b++) fill_block(workers[i].buf + b * BLOCK, BLOCK, SEED, b);
        CHECK(pthread_create(&threads[i], NULL, put_and_get, &workers[i]) == 0);
    }
    struct timespec pause = {.tv_nsec = 20 * 1000 * 1000};
    nanosleep(&pause, NULL);
    CHECK_OK(kvferry_store_destroy(store));
    for (int i = 0; i < 2; i++) free(workers[i].buf); /* before joining: nothing may touch them now */
    for (int i = 0; i < 2; i++) {
        CHECK(pthread_join(threads[i], NULL) == 0);
        CHECK(workers[i].refused);
    }
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/kvferry-store-XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    snprintf(disk_option, sizeof disk_option, "disk.dir=%s/tier", dir);
    uint8_t *src = aligned_alloc(4096, (size_t)BLOCKS * BLOCK);
    uint8_t *dst = aligned_alloc(4096, (size_t)BLOCKS * BLOCK);
    CHECK(src != NULL && dst != NULL);

    kvferry_block_key keys[BLOCKS];
    keys_for(keys);
    kvferry_store store = open_store();
    tiers(store, keys, src, dst);
    CHECK_OK(kvferry_store_destroy(store));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_store_destroy(store));
    restart(keys, dst);
    remote_tier(keys, src, dst);
    remote_errors(keys);

    creation_errors();
    key_errors();
    store = open_store();
    operation_errors(store, keys, src);
    CHECK_OK(kvferry_store_clear(store));
    lookup_too_small(store, keys, src);
    handle_errors(store, keys);
    CHECK_OK(kvferry_store_destroy(store));
    destroy_with_pending_ops(keys);
    destroy_under_threads(keys);

    free(src);
    free(dst);
    char command[128];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    CHECK(system(command) == 0);
    printf("store: put, lookup, get from DRAM, disk and a remote tier, restart, events and error paths pass\n");
    return 0;
}
