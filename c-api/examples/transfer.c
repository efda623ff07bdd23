/* Two agents (in one process here; normally a prefill and a decode worker) find each other through
 * the side channel, then the decode side reads three KV blocks and tells the prefill side it may
 * free them.
 *
 * Build against an installed kvferry:
 *   cc transfer.c $(pkg-config --cflags --libs kvferry) -o transfer
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvferry.h>

#define BLOCK (64 * 1024)
#define BLOCKS 16

/* Every kvferry call returns a status; on failure the thread's last error message says why. */
#define TRY(call)                                                                                 \
    do {                                                                                          \
        kvferry_status status_ = (call);                                                          \
        if (status_ != KVFERRY_OK) {                                                              \
            fprintf(stderr, "%s failed: %s (%s)\n", #call, kvferry_last_error_message(),          \
                    kvferry_status_name(status_));                                                \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

/* Descriptors for every block of a buffer: transfers later pick blocks by index. */
static void blocks_of(const unsigned char *buf, kvferry_region regions[BLOCKS]) {
    for (int i = 0; i < BLOCKS; i++) {
        regions[i] = (kvferry_region){.addr = (uintptr_t)(buf + i * BLOCK), .len = BLOCK, .mem_kind = KVFERRY_MEM_HOST};
    }
}

int main(void) {
    if (kvferry_abi_version() != KVFERRY_ABI_VERSION) {
        fprintf(stderr, "libkvferry %s does not match this header\n", kvferry_version());
        return 1;
    }

    /* Prefill side: owns the KV blocks, registers them, and serves its metadata. */
    unsigned char *kv = aligned_alloc(4096, BLOCKS * BLOCK);
    unsigned char *dst = aligned_alloc(4096, BLOCKS * BLOCK);
    if (kv == NULL || dst == NULL) return 1;
    memset(kv, 0xAB, BLOCKS * BLOCK);
    memset(dst, 0, BLOCKS * BLOCK);
    kvferry_agent prefill;
    TRY(kvferry_agent_create("prefill-0", NULL, 0, &prefill));
    kvferry_registration kv_reg; /* the memory stays ours; kvferry only gains access to it */
    TRY(kvferry_register(prefill, (kvferry_region){.addr = (uintptr_t)kv, .len = BLOCKS * BLOCK}, &kv_reg));
    uint16_t port;
    TRY(kvferry_side_channel_serve(prefill, "127.0.0.1:0", &port));

    /* Decode side: finds the prefill agent from host:port alone. */
    const char *options[] = {"tcp.streams=2"};
    kvferry_agent decode;
    TRY(kvferry_agent_create("decode-0", options, 1, &decode));
    kvferry_registration dst_reg;
    TRY(kvferry_register(decode, (kvferry_region){.addr = (uintptr_t)dst, .len = BLOCKS * BLOCK}, &dst_reg));
    char address[32];
    snprintf(address, sizeof address, "127.0.0.1:%u", port);
    kvferry_peer peer;
    TRY(kvferry_peer_connect(decode, address, 5000, &peer));

    /* Prepare descriptor lists once (checked here), then pick blocks by index per request. In a
     * real deployment the prefill side sends its block addresses along with the request. */
    kvferry_region regions[BLOCKS];
    kvferry_descs local, remote;
    blocks_of(dst, regions);
    TRY(kvferry_descs_prepare_local(decode, regions, BLOCKS, &local));
    blocks_of(kv, regions);
    TRY(kvferry_descs_prepare_remote(peer, regions, BLOCKS, &remote));

    /* Read prefill blocks 7, 3, 9 into local blocks 0, 1, 2; the notification reaches the prefill
     * side only after the data is in place. Every transfer has a deadline (5 s here). */
    const size_t local_blocks[] = {0, 1, 2}, remote_blocks[] = {7, 3, 9};
    const char note[] = "req-42:done";
    kvferry_transfer xfer;
    TRY(kvferry_transfer_post(decode, KVFERRY_OP_READ, local, local_blocks, remote, remote_blocks, 3,
                              (const uint8_t *)note, strlen(note), 5000, &xfer));
    TRY(kvferry_transfer_wait(xfer)); /* or kvferry_transfer_poll from an engine's step loop */
    for (size_t i = 0; i < 3 * BLOCK; i++) {
        if (dst[i] != 0xAB) {
            fprintf(stderr, "byte %zu did not arrive\n", i);
            return 1;
        }
    }

    /* The prefill side learns the blocks were read and may reuse them. */
    char from[64];
    unsigned char data[64];
    size_t from_len, data_len;
    TRY(kvferry_notification_take(prefill, 5000, from, sizeof from, &from_len, data, sizeof data, &data_len));
    printf("%s says %.*s\n", from, (int)data_len, (const char *)data);
    uint64_t bytes;
    TRY(kvferry_transfer_bytes(xfer, &bytes));
    printf("moved %llu bytes\n", (unsigned long long)bytes);

    /* Destroying an agent releases every handle made from it (here: registration, peer, lists,
     * transfer); afterwards kvferry no longer touches the memory, which we can free. */
    TRY(kvferry_agent_destroy(decode));
    TRY(kvferry_agent_destroy(prefill));
    free(kv);
    free(dst);
    return 0;
}
