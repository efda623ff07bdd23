/* Several threads post, wait and destroy transfers through one agent while the main thread checks
 * the bytes they read; then the agent is destroyed while the threads are still using it. Every
 * call must either succeed or fail with a code that says why (the handle is gone, the transfer
 * was cancelled), never crash, and once kvferry_agent_destroy returns the memory may be freed.
 * Run under valgrind by the test script. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>

#include "check.h"

#define BLOCK 4096
#define BLOCKS 64
#define THREADS 4
#define ROUNDS 50
#define TIMEOUT_MS 30000

static kvferry_agent initiator;
static kvferry_descs local, remote;
static uint8_t *local_buf;
static atomic_int agent_gone;
static atomic_int transfers_done;

/* Each thread owns local blocks [16 t, 16 t + 16) and reads remote blocks into them. */
static void *reader(void *arg) {
    size_t t = (size_t)(uintptr_t)arg;
    for (size_t round = 0;; round++) {
        size_t local_idx[4], remote_idx[4];
        for (size_t i = 0; i < 4; i++) {
            local_idx[i] = t * 16 + (round + i) % 16;
            remote_idx[i] = (round * 7 + i * 13 + t) % BLOCKS;
        }
        kvferry_transfer xfer;
        kvferry_status posted = kvferry_transfer_post(initiator, KVFERRY_OP_READ, local, local_idx, remote,
                                                      remote_idx, 4, NULL, 0, TIMEOUT_MS, &xfer);
        if (posted != KVFERRY_OK) {
            /* Only once the agent is being destroyed: its handles are gone, or (for a call that
             * looked them up just before) its registrations already are. */
            CHECK(atomic_load(&agent_gone));
            CHECK(posted == KVFERRY_ERR_INVALID_HANDLE || posted == KVFERRY_ERR_NOT_REGISTERED);
            if (posted == KVFERRY_ERR_INVALID_HANDLE) return NULL;
            continue;
        }
        kvferry_status waited = kvferry_transfer_wait(xfer);
        if (waited == KVFERRY_OK) {
            for (size_t i = 0; i < 4; i++) {
                CHECK(block_matches(local_buf + local_idx[i] * BLOCK, BLOCK, 3, remote_idx[i]));
            }
            atomic_fetch_add(&transfers_done, 1);
        } else {
            /* The agent's destruction cancels transfers in flight and invalidates their handles. */
            CHECK(atomic_load(&agent_gone));
            CHECK(waited == KVFERRY_ERR_INVALID_HANDLE || waited == KVFERRY_ERR_CANCELLED);
        }
        kvferry_status destroyed = kvferry_transfer_destroy(xfer);
        CHECK(destroyed == KVFERRY_OK || (atomic_load(&agent_gone) && destroyed == KVFERRY_ERR_INVALID_HANDLE));
    }
}

int main(void) {
    uint8_t *remote_buf = aligned_alloc(4096, (size_t)BLOCKS * BLOCK);
    local_buf = aligned_alloc(4096, (size_t)BLOCKS * BLOCK);
    CHECK(remote_buf != NULL && local_buf != NULL);
    for (size_t b = 0; b < BLOCKS; b++) fill_block(remote_buf + b * BLOCK, BLOCK, 3, b);

    kvferry_agent target;
    CHECK_OK(kvferry_agent_create("threads-target", NULL, 0, &target));
    CHECK_OK(kvferry_agent_create("threads-initiator", NULL, 0, &initiator));
    kvferry_registration regs[2];
    CHECK_OK(kvferry_register(target, (kvferry_region){.addr = (uintptr_t)remote_buf, .len = BLOCKS * BLOCK}, &regs[0]));
    CHECK_OK(kvferry_register(initiator, (kvferry_region){.addr = (uintptr_t)local_buf, .len = BLOCKS * BLOCK}, &regs[1]));
    size_t md_len = 0;
    CHECK_STATUS(KVFERRY_ERR_BUFFER_TOO_SMALL, kvferry_agent_metadata(target, NULL, 0, &md_len));
    uint8_t *md = malloc(md_len);
    CHECK(md != NULL);
    CHECK_OK(kvferry_agent_metadata(target, md, md_len, &md_len));
    kvferry_peer peer;
    CHECK_OK(kvferry_peer_add(initiator, md, md_len, &peer));
    free(md);

    kvferry_region regions[BLOCKS];
    for (size_t i = 0; i < BLOCKS; i++) {
        regions[i] = (kvferry_region){.addr = (uintptr_t)(local_buf + i * BLOCK), .len = BLOCK};
    }
    CHECK_OK(kvferry_descs_prepare_local(initiator, regions, BLOCKS, &local));
    for (size_t i = 0; i < BLOCKS; i++) {
        regions[i] = (kvferry_region){.addr = (uintptr_t)(remote_buf + i * BLOCK), .len = BLOCK};
    }
    CHECK_OK(kvferry_descs_prepare_remote(peer, regions, BLOCKS, &remote));

    pthread_t threads[THREADS];
    for (size_t t = 0; t < THREADS; t++) {
        CHECK(pthread_create(&threads[t], NULL, reader, (void *)(uintptr_t)t) == 0);
    }
    while (atomic_load(&transfers_done) < THREADS * ROUNDS) {
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    /* Pull the agent out from under the threads. */
    atomic_store(&agent_gone, 1);
    CHECK_OK(kvferry_agent_destroy(initiator));
    for (size_t t = 0; t < THREADS; t++) CHECK(pthread_join(threads[t], NULL) == 0);
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_descs_destroy(local));
    CHECK_OK(kvferry_agent_destroy(target));
    free(local_buf);
    free(remote_buf);
    printf("threads: %d transfers from %d threads byte-exact; destroying the agent under them was safe\n",
           atomic_load(&transfers_done), THREADS);
    return 0;
}
