/* Every way a C caller can misuse the library gets a status code and a message, and nothing
 * crashes or is lost: NULL pointers, bad lengths, invalid, destroyed and mistyped handles, double
 * destroy, malformed metadata, out-of-range descriptors, too-small output buffers, dead peers.
 * Run under valgrind by the test script, so any invalid access or leak on these paths fails it. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "check.h"

#define BLOCK 4096
#define BLOCKS 8
#define SHORT_MS 2000

static uint8_t *alloc_blocks(void) {
    uint8_t *buf = aligned_alloc(4096, (size_t)BLOCKS * BLOCK);
    CHECK(buf != NULL);
    memset(buf, 0, (size_t)BLOCKS * BLOCK);
    return buf;
}

static kvferry_region host_region(const uint8_t *addr, uint64_t len) {
    return (kvferry_region){.addr = (uintptr_t)addr, .len = len, .mem_kind = KVFERRY_MEM_HOST};
}

static void block_regions(const uint8_t *buf, kvferry_region regions[BLOCKS]) {
    for (size_t i = 0; i < BLOCKS; i++) regions[i] = host_region(buf + i * BLOCK, BLOCK);
}

static void versions(void) {
    CHECK(kvferry_abi_version() == KVFERRY_ABI_VERSION);
    CHECK(kvferry_version()[0] >= '0' && kvferry_version()[0] <= '9');
    CHECK(strcmp(kvferry_status_name(KVFERRY_ERR_TIMEOUT), "KVFERRY_ERR_TIMEOUT") == 0);
    CHECK(strcmp(kvferry_status_name(KVFERRY_OK), "KVFERRY_OK") == 0);
    CHECK(strcmp(kvferry_status_name(12345), "KVFERRY_ERR_UNKNOWN") == 0);
}

static void agent_creation(void) {
    kvferry_agent agent = {0};
    const char *options[] = {"tcp.streams=3", NULL};
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_agent_create(NULL, NULL, 0, &agent));
    CHECK(strstr(kvferry_last_error_message(), "name") != NULL);
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_agent_create("a", NULL, 0, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_agent_create("a", NULL, 2, &agent));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_agent_create("a", options, 2, &agent));
    CHECK(strstr(kvferry_last_error_message(), "options[1]") != NULL);
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_agent_create("", NULL, 0, &agent));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_agent_create("\xff\xfe", NULL, 0, &agent));

    const char *bad[][1] = {{"tcp.streams=0"}, {"tcp.streams=many"}, {"tcp.listen=nowhere"}, {"no-equals-sign"},
                            {"tcp.colour=blue"}, {"shm=maybe"}, {"tcp=maybe"}, {"tcp.connect_timeout_ms=0"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_agent_create("a", bad[i], 1, &agent));
    }
    const char *no_transport[] = {"tcp=off", "shm=off"};
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_agent_create("a", no_transport, 2, &agent));
    CHECK(agent.id == 0); /* no failed call wrote its output */
}

static void invalid_handles(kvferry_agent agent, kvferry_registration reg) {
    kvferry_agent never = {0}, forged = {0x7fffffffffffull};
    size_t len = 0;
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_agent_metadata(never, NULL, 0, &len));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_agent_metadata(forged, NULL, 0, &len));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_agent_destroy(never));
    /* A handle of another kind, with a valid id: kinds are checked, not only ids. */
    kvferry_agent reg_as_agent = {reg.id};
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_agent_destroy(reg_as_agent));
    kvferry_registration agent_as_reg = {agent.id};
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_registration_destroy(agent_as_reg));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_transfer_wait((kvferry_transfer){reg.id}));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_peer_destroy((kvferry_peer){agent.id}));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_descs_destroy((kvferry_descs){0}));
}

static void registration(kvferry_agent agent, uint8_t *buf) {
    kvferry_registration reg;
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_register(agent, host_region(buf, BLOCK), NULL));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_register(agent, host_region(buf, 0), &reg));
    kvferry_region wraps = {.addr = UINT64_MAX - 10, .len = 100, .mem_kind = KVFERRY_MEM_HOST};
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_register(agent, wraps, &reg));
    kvferry_region strange = {.addr = (uintptr_t)buf, .len = BLOCK, .mem_kind = 9};
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_register(agent, strange, &reg));
    kvferry_region gpu = {.addr = 0x10000, .len = BLOCK, .mem_kind = KVFERRY_MEM_CUDA, .device = 0};
    CHECK_STATUS(KVFERRY_ERR_UNSUPPORTED, kvferry_register(agent, gpu, &reg)); /* no transport moves it */

    CHECK_OK(kvferry_register(agent, host_region(buf, BLOCK), &reg));
    CHECK_OK(kvferry_registration_destroy(reg));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_registration_destroy(reg)); /* double destroy */
}

/* Copies `agent`'s metadata into a malloc'd buffer, after checking the size negotiation. */
static uint8_t *metadata_of(kvferry_agent agent, size_t *len) {
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_agent_metadata(agent, NULL, 0, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_agent_metadata(agent, NULL, 64, len));
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_agent_metadata(agent, NULL, 0, len));
    CHECK(*len > 0);
    uint8_t small[4];
    size_t needed = *len;
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_agent_metadata(agent, small, sizeof small, len));
    CHECK(*len == needed);
    uint8_t *md = malloc(needed);
    CHECK(md != NULL);
    CHECK_OK(kvferry_agent_metadata(agent, md, needed, len));
    CHECK(*len == needed);
    return md;
}

static void malformed_metadata(kvferry_agent agent, const uint8_t *md, size_t len) {
    kvferry_peer peer;
    uint8_t *copy = malloc(len);
    CHECK(copy != NULL);
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_peer_add(agent, NULL, 5, &peer));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_peer_add(agent, md, len, NULL));
    CHECK_STATUS(KVFERRY_ERR_METADATA_TRUNCATED, kvferry_peer_add(agent, md, 3, &peer));
    CHECK_STATUS(KVFERRY_ERR_METADATA_TRUNCATED, kvferry_peer_add(agent, NULL, 0, &peer));
    memcpy(copy, md, len);
    copy[0] ^= 0xff;
    CHECK_STATUS(KVFERRY_ERR_METADATA_BAD_MAGIC, kvferry_peer_add(agent, copy, len, &peer));
    memcpy(copy, md, len);
    copy[len - 1] ^= 0xff; /* the body's checksum no longer matches */
    CHECK_STATUS(KVFERRY_ERR_METADATA_CORRUPT, kvferry_peer_add(agent, copy, len, &peer));
    free(copy);
}

static void descriptors(kvferry_agent agent, kvferry_peer peer, const uint8_t *buf, const uint8_t *remote_buf) {
    kvferry_descs descs;
    kvferry_region regions[BLOCKS];
    block_regions(buf, regions);
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_descs_prepare_local(agent, NULL, 2, &descs));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_descs_prepare_local(agent, regions, 2, NULL));
    static uint8_t unregistered[BLOCK];
    kvferry_region outside = host_region(unregistered, BLOCK);
    CHECK_STATUS(KVFERRY_ERR_NOT_REGISTERED, kvferry_descs_prepare_local(agent, &outside, 1, &descs));
    kvferry_region past_end = host_region(buf + (BLOCKS - 1) * BLOCK, 2 * BLOCK);
    CHECK_STATUS(KVFERRY_ERR_NOT_REGISTERED, kvferry_descs_prepare_local(agent, &past_end, 1, &descs));
    kvferry_region empty = host_region(buf, 0);
    CHECK_STATUS(KVFERRY_ERR_ZERO_LENGTH, kvferry_descs_prepare_local(agent, &empty, 1, &descs));
    kvferry_region wraps = {.addr = UINT64_MAX - 10, .len = 100, .mem_kind = KVFERRY_MEM_HOST};
    CHECK_STATUS(KVFERRY_ERR_RANGE_OVERFLOW, kvferry_descs_prepare_local(agent, &wraps, 1, &descs));
    kvferry_region remote_past_end = host_region(remote_buf + (BLOCKS - 1) * BLOCK, 2 * BLOCK);
    CHECK_STATUS(KVFERRY_ERR_REMOTE_REGION_UNKNOWN, kvferry_descs_prepare_remote(peer, &remote_past_end, 1, &descs));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_descs_prepare_remote((kvferry_peer){agent.id}, regions, 1, &descs));
}

static void bad_transfers(kvferry_agent agent, kvferry_agent other, kvferry_descs local, kvferry_descs remote,
                          kvferry_descs others_local) {
    kvferry_transfer xfer = {0};
    const size_t idx[] = {0, 1}, out_of_range[] = {0, BLOCKS};
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT,
                 kvferry_transfer_post(agent, 0, local, idx, remote, idx, 2, NULL, 0, SHORT_MS, &xfer));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, NULL, remote, idx, 2, NULL, 0, SHORT_MS, &xfer));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, idx, remote, NULL, 2, NULL, 0, SHORT_MS, &xfer));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, idx, remote, idx, 2, NULL, 0, SHORT_MS, NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, idx, remote, idx, 2, NULL, 4, SHORT_MS, &xfer));
    CHECK_STATUS(KVFERRY_ERR_DESC_INDEX_OUT_OF_RANGE,
                 kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, out_of_range, remote, idx, 2, NULL, 0,
                                       SHORT_MS, &xfer));
    CHECK_STATUS(KVFERRY_ERR_EMPTY_TRANSFER,
                 kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, NULL, remote, NULL, 0, NULL, 0, SHORT_MS, &xfer));
    /* The lists swapped: the local one was prepared for a peer and the remote one for local memory. */
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT,
                 kvferry_transfer_post(agent, KVFERRY_OP_WRITE, remote, idx, local, idx, 2, NULL, 0, SHORT_MS, &xfer));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_transfer_post(agent, KVFERRY_OP_WRITE, others_local, idx, remote,
                                                                     idx, 2, NULL, 0, SHORT_MS, &xfer));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT,
                 kvferry_transfer_post(other, KVFERRY_OP_WRITE, local, idx, remote, idx, 2, NULL, 0, SHORT_MS, &xfer));
    /* A notification over the 1 MiB limit. */
    size_t huge_len = (1u << 20) + 1;
    uint8_t *huge = calloc(1, huge_len);
    CHECK(huge != NULL);
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, idx, remote, idx,
                                                                     2, huge, huge_len, SHORT_MS, &xfer));
    free(huge);
    CHECK(xfer.id == 0);
}

static void length_mismatch(kvferry_agent agent, kvferry_peer peer, const uint8_t *buf, const uint8_t *remote_buf) {
    kvferry_region half = host_region(buf, BLOCK / 2), whole = host_region(remote_buf, BLOCK);
    kvferry_descs local, remote;
    kvferry_transfer xfer;
    const size_t first[] = {0};
    CHECK_OK(kvferry_descs_prepare_local(agent, &half, 1, &local));
    CHECK_OK(kvferry_descs_prepare_remote(peer, &whole, 1, &remote));
    CHECK_STATUS(KVFERRY_ERR_LENGTH_MISMATCH, kvferry_transfer_post(agent, KVFERRY_OP_READ, local, first, remote,
                                                                    first, 1, NULL, 0, SHORT_MS, &xfer));
    CHECK_OK(kvferry_descs_destroy(local));
    CHECK_OK(kvferry_descs_destroy(remote));
}

/* A real WRITE between two agents, then every way of misusing its handle afterwards. */
static void transfer_lifecycle(kvferry_agent agent, kvferry_descs local, kvferry_descs remote, uint8_t *buf,
                               const uint8_t *remote_buf) {
    const size_t idx[] = {2, 3};
    fill_block(buf + 2 * BLOCK, BLOCK, 7, 2);
    fill_block(buf + 3 * BLOCK, BLOCK, 7, 3);
    kvferry_transfer xfer;
    CHECK_OK(kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, idx, remote, idx, 2, NULL, 0, SHORT_MS, &xfer));
    CHECK_OK(kvferry_transfer_wait(xfer));
    bool done = false;
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_transfer_poll(xfer, NULL));
    CHECK_OK(kvferry_transfer_poll(xfer, &done));
    CHECK(done);
    CHECK_OK(kvferry_transfer_cancel(xfer)); /* too late to cancel: the outcome stays */
    CHECK_OK(kvferry_transfer_wait(xfer));
    uint64_t bytes = 0;
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_transfer_bytes(xfer, NULL));
    CHECK_OK(kvferry_transfer_bytes(xfer, &bytes));
    CHECK(bytes == 2 * BLOCK);
    CHECK(block_matches(remote_buf + 2 * BLOCK, BLOCK, 7, 2) && block_matches(remote_buf + 3 * BLOCK, BLOCK, 7, 3));
    /* The write shows in the agent's metrics. */
    size_t metrics_len = 0;
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_agent_metrics(agent, NULL, 0, &metrics_len));
    CHECK(metrics_len > 0);
    char *metrics = malloc(metrics_len + 1);
    CHECK(metrics != NULL);
    CHECK_OK(kvferry_agent_metrics(agent, (uint8_t *)metrics, metrics_len, &metrics_len));
    metrics[metrics_len] = '\0';
    CHECK(strstr(metrics, "# TYPE kvferry_transfer_bytes_total counter") != NULL);
    CHECK(strstr(metrics, ",direction=\"write\"} ") != NULL);
    free(metrics);
    CHECK_OK(kvferry_transfer_destroy(xfer));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_transfer_destroy(xfer));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_transfer_wait(xfer));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_transfer_poll(xfer, &done));
}

static void notifications(kvferry_peer to_receiver, kvferry_agent receiver) {
    char from[64];
    uint8_t data[64];
    size_t from_len = 0, data_len = 0;
    CHECK_STATUS(KVFERRY_ERR_TIMEOUT,
                 kvferry_notification_take(receiver, 0, from, sizeof from, &from_len, data, sizeof data, &data_len));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_notification_take(receiver, 0, NULL, 8, &from_len, data, sizeof data, &data_len));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER,
                 kvferry_notification_take(receiver, 0, from, sizeof from, &from_len, data, sizeof data, NULL));

    kvferry_transfer xfer;
    const char text[] = "block 3 is yours";
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_notify(to_receiver, NULL, 4, SHORT_MS, &xfer));
    CHECK_OK(kvferry_notify(to_receiver, (const uint8_t *)text, strlen(text), SHORT_MS, &xfer));
    CHECK_OK(kvferry_transfer_wait(xfer));
    CHECK_OK(kvferry_transfer_destroy(xfer));

    /* Too small: the needed sizes come back and the notification stays queued. */
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL,
                 kvferry_notification_take(receiver, SHORT_MS, from, 2, &from_len, data, sizeof data, &data_len));
    CHECK(from_len == strlen("errors-a") + 1 && data_len == strlen(text));
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL,
                 kvferry_notification_take(receiver, SHORT_MS, from, sizeof from, &from_len, data, 3, &data_len));
    CHECK_OK(kvferry_notification_take(receiver, SHORT_MS, from, sizeof from, &from_len, data, sizeof data, &data_len));
    CHECK(strcmp(from, "errors-a") == 0 && data_len == strlen(text) && memcmp(data, text, data_len) == 0);
    CHECK_STATUS(KVFERRY_ERR_TIMEOUT,
                 kvferry_notification_take(receiver, 0, from, sizeof from, &from_len, data, sizeof data, &data_len));
}

static void peers(kvferry_agent agent, kvferry_peer known) {
    kvferry_peer peer;
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_peer_lookup(agent, NULL, &peer));
    CHECK_STATUS(KVFERRY_ERR_UNKNOWN_PEER, kvferry_peer_lookup(agent, "nobody", &peer));
    CHECK_OK(kvferry_peer_lookup(agent, "errors-b", &peer));
    CHECK(peer.id == known.id); /* one peer, one handle */

    char name[4];
    size_t len = 0;
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_peer_name(known, name, sizeof name, &len));
    CHECK(len == strlen("errors-b") + 1);
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_peer_name(known, NULL, 16, &len));

    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_peer_connect(agent, NULL, SHORT_MS, &peer));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_peer_connect(agent, "127.0.0.1:1", SHORT_MS, NULL));
    /* Nothing listens on port 1. */
    CHECK_STATUS(KVFERRY_ERR_PEER_UNREACHABLE, kvferry_peer_connect(agent, "127.0.0.1:1", SHORT_MS, &peer));
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_side_channel_serve(agent, "not an address", NULL));
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_side_channel_serve(agent, NULL, NULL));
    CHECK_OK(kvferry_side_channel_serve(agent, "127.0.0.1:0", NULL));
}

/* A registration on the peer changes its metadata: lists prepared before are stale. */
static void stale_descriptors(kvferry_agent agent, kvferry_agent other, kvferry_descs local, kvferry_descs remote) {
    static uint8_t extra[BLOCK];
    kvferry_registration reg;
    CHECK_OK(kvferry_register(other, host_region(extra, sizeof extra), &reg));
    size_t len = 0;
    uint8_t *md = metadata_of(other, &len);
    kvferry_peer same;
    CHECK_OK(kvferry_peer_add(agent, md, len, &same));
    free(md);
    const size_t idx[] = {0};
    kvferry_transfer xfer;
    CHECK_STATUS(KVFERRY_ERR_STALE_DESCRIPTORS,
                 kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, idx, remote, idx, 1, NULL, 0, SHORT_MS, &xfer));
    CHECK_OK(kvferry_registration_destroy(reg));
}

static void *fail_on_another_thread(void *arg) {
    (void)arg;
    kvferry_agent none = {0};
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_agent_destroy(none));
    return NULL;
}

/* The last error belongs to the thread that made the call. */
static void thread_local_messages(void) {
    kvferry_agent agent;
    CHECK_STATUS(KVFERRY_ERR_NULL_POINTER, kvferry_agent_create(NULL, NULL, 0, &agent));
    char before[256];
    snprintf(before, sizeof before, "%s", kvferry_last_error_message());
    pthread_t thread;
    CHECK(pthread_create(&thread, NULL, fail_on_another_thread, NULL) == 0);
    CHECK(pthread_join(thread, NULL) == 0);
    CHECK(strcmp(before, kvferry_last_error_message()) == 0);
}

int main(void) {
    versions();
    agent_creation();
    thread_local_messages();

    uint8_t *buf_a = alloc_blocks(), *buf_b = alloc_blocks();
    kvferry_agent a, b;
    CHECK_OK(kvferry_agent_create("errors-a", NULL, 0, &a));
    CHECK_OK(kvferry_agent_create("errors-b", NULL, 0, &b));
    kvferry_registration reg_a, reg_b;
    CHECK_OK(kvferry_register(a, host_region(buf_a, (size_t)BLOCKS * BLOCK), &reg_a));
    CHECK_OK(kvferry_register(b, host_region(buf_b, (size_t)BLOCKS * BLOCK), &reg_b));
    invalid_handles(a, reg_a);
    registration(a, buf_a);

    size_t md_len = 0;
    uint8_t *md_a = metadata_of(a, &md_len);
    CHECK_STATUS(KVFERRY_ERR_INVALID_ARGUMENT, kvferry_peer_add(a, md_a, md_len, &(kvferry_peer){0})); /* itself */
    kvferry_peer a_at_b;
    CHECK_OK(kvferry_peer_add(b, md_a, md_len, &a_at_b));
    free(md_a);
    uint8_t *md_b = metadata_of(b, &md_len);
    malformed_metadata(a, md_b, md_len);
    kvferry_peer b_at_a, again;
    CHECK_OK(kvferry_peer_add(a, md_b, md_len, &b_at_a));
    CHECK_OK(kvferry_peer_add(a, md_b, md_len, &again));
    CHECK(again.id == b_at_a.id);
    free(md_b);

    kvferry_region regions[BLOCKS];
    kvferry_descs local, remote, b_local;
    block_regions(buf_a, regions);
    CHECK_OK(kvferry_descs_prepare_local(a, regions, BLOCKS, &local));
    block_regions(buf_b, regions);
    CHECK_OK(kvferry_descs_prepare_remote(b_at_a, regions, BLOCKS, &remote));
    CHECK_OK(kvferry_descs_prepare_local(b, regions, BLOCKS, &b_local));

    descriptors(a, b_at_a, buf_a, buf_b);
    bad_transfers(a, b, local, remote, b_local);
    length_mismatch(a, b_at_a, buf_a, buf_b);
    transfer_lifecycle(a, local, remote, buf_a, buf_b);
    notifications(b_at_a, b);
    peers(a, b_at_a);

    /* A local list outlives its registration but cannot move data through it. */
    const size_t idx[] = {0};
    kvferry_transfer xfer;
    kvferry_descs b_remote;
    block_regions(buf_a, regions);
    CHECK_OK(kvferry_descs_prepare_remote(a_at_b, regions, 1, &b_remote));
    CHECK_OK(kvferry_registration_destroy(reg_b));
    CHECK_STATUS(KVFERRY_ERR_NOT_REGISTERED, kvferry_transfer_post(b, KVFERRY_OP_WRITE, b_local, idx, b_remote, idx, 1,
                                                                   NULL, 0, SHORT_MS, &xfer));
    CHECK_OK(kvferry_register(b, host_region(buf_b, (size_t)BLOCKS * BLOCK), &reg_b));
    stale_descriptors(a, b, local, remote);

    /* A dead peer: its agent is gone, so the transfer fails quickly instead of hanging. */
    CHECK_OK(kvferry_agent_destroy(b));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_registration_destroy(reg_b)); /* went with b */
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_descs_destroy(b_remote));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_peer_destroy(a_at_b));
    CHECK_OK(kvferry_descs_destroy(remote));
    block_regions(buf_b, regions);
    CHECK_OK(kvferry_descs_prepare_remote(b_at_a, regions, 1, &remote));
    CHECK_OK(kvferry_transfer_post(a, KVFERRY_OP_WRITE, local, idx, remote, idx, 1, NULL, 0, SHORT_MS, &xfer));
    kvferry_status dead = kvferry_transfer_wait(xfer);
    CHECK(dead == KVFERRY_ERR_PEER_UNREACHABLE || dead == KVFERRY_ERR_PEER_DISCONNECTED);
    CHECK(strstr(kvferry_last_error_message(), "errors-b") != NULL); /* the error names the peer */
    bool done = false;
    CHECK_STATUS(dead, kvferry_transfer_poll(xfer, &done));
    CHECK(done);

    /* Forgetting a peer invalidates its handle, and lists prepared for it fail. */
    CHECK_OK(kvferry_peer_destroy(b_at_a));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_peer_destroy(b_at_a));
    CHECK_STATUS(KVFERRY_ERR_UNKNOWN_PEER,
                 kvferry_transfer_post(a, KVFERRY_OP_WRITE, local, idx, remote, idx, 1, NULL, 0, SHORT_MS, &xfer));

    /* Destroying the agent takes its remaining handles along; a second destroy is detected. */
    CHECK_OK(kvferry_agent_destroy(a));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_agent_destroy(a));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_registration_destroy(reg_a));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_descs_destroy(local));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_transfer_destroy(xfer));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_agent_metadata(a, NULL, 0, &md_len));
    free(buf_a);
    free(buf_b);
    printf("errors: every misuse returned its status code and message\n");
    return 0;
}
