/* Two processes move KV blocks over TCP through the installed C library and check every byte.
 *
 * The parent serves: it registers 16 blocks (pattern 1) and a side channel. The child connects,
 * READs three of them (polling), WRITEs 8 blocks of its own (pattern 2) with a notification that
 * tells the parent where its buffer is, and waits. The parent checks what was written, then
 * WRITEs 4 blocks into the child's buffer with a notification of its own; the child checks them.
 * The process is forked before any kvferry call, so each side has its own library state. */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define BLOCK (64 * 1024)
#define BLOCKS 16
#define TIMEOUT_MS 30000
/* Server and client are forked processes: they prove one cluster secret to each other. */
#define SECRET "secret=the C two-process test's cluster secret"

static uint8_t *alloc_blocks(void) {
    uint8_t *buf = aligned_alloc(4096, (size_t)BLOCKS * BLOCK);
    CHECK(buf != NULL);
    return buf;
}

/* Descriptors for all blocks of a buffer that starts at `addr`. */
static void block_regions(uint64_t addr, kvferry_region regions[BLOCKS]) {
    for (size_t i = 0; i < BLOCKS; i++) {
        regions[i] = (kvferry_region){.addr = addr + i * BLOCK, .len = BLOCK, .mem_kind = KVFERRY_MEM_HOST};
    }
}

/* Lists of all blocks of our buffer and of the peer's buffer at `peer_addr`. */
static void prepare_lists(kvferry_agent agent, kvferry_peer peer, const uint8_t *buf, uint64_t peer_addr,
                          kvferry_descs *local, kvferry_descs *remote) {
    kvferry_region regions[BLOCKS];
    block_regions((uintptr_t)buf, regions);
    CHECK_OK(kvferry_descs_prepare_local(agent, regions, BLOCKS, local));
    block_regions(peer_addr, regions);
    CHECK_OK(kvferry_descs_prepare_remote(peer, regions, BLOCKS, remote));
}

/* Wait for one notification from `expected_from` and return its payload, NUL-terminated. */
static void take_notification(kvferry_agent agent, const char *expected_from, char *payload, size_t capacity) {
    char from[64];
    size_t from_len = 0, payload_len = 0;
    CHECK_OK(kvferry_notification_take(agent, TIMEOUT_MS, from, sizeof from, &from_len, (uint8_t *)payload,
                                       capacity - 1, &payload_len));
    CHECK(strcmp(from, expected_from) == 0 && from_len == strlen(expected_from));
    payload[payload_len] = '\0';
}

static int serve(int info_fd, pid_t client) {
    uint8_t *buf = alloc_blocks();
    for (size_t b = 0; b < BLOCKS; b++) fill_block(buf + b * BLOCK, BLOCK, 1, b);

    kvferry_agent agent;
    /* TCP only: both processes share this host, where an agent would otherwise pick shared memory. */
    const char *options[] = {"tcp.listen=127.0.0.1:0", "tcp.streams=2", "shm=off", SECRET};
    CHECK_OK(kvferry_agent_create("c-server", options, 4, &agent));
    kvferry_registration reg;
    kvferry_region whole = {.addr = (uintptr_t)buf, .len = (uint64_t)BLOCKS * BLOCK, .mem_kind = KVFERRY_MEM_HOST};
    CHECK_OK(kvferry_register(agent, whole, &reg));
    uint16_t port = 0;
    CHECK_OK(kvferry_side_channel_serve(agent, "127.0.0.1:0", &port));
    CHECK(port != 0);
    dprintf(info_fd, "%u %" PRIu64 "\n", port, (uint64_t)(uintptr_t)buf);
    close(info_fd);

    /* The child's WRITE is in place once its notification arrives. */
    char note[128];
    take_notification(agent, "c-client", note, sizeof note);
    uint64_t client_addr = 0;
    CHECK(sscanf(note, "written %" SCNu64, &client_addr) == 1);
    for (size_t b = 0; b < BLOCKS; b++) CHECK(block_matches(buf + b * BLOCK, BLOCK, b < 8 ? 1 : 2, b));

    /* The child connected through the side channel, so it is a peer already. */
    kvferry_peer client_peer;
    CHECK_OK(kvferry_peer_lookup(agent, "c-client", &client_peer));
    kvferry_descs local, remote;
    prepare_lists(agent, client_peer, buf, client_addr, &local, &remote);
    const size_t from_blocks[] = {0, 1, 2, 3}, to_blocks[] = {12, 13, 14, 15};
    const char reply[] = "reply";
    kvferry_transfer xfer;
    CHECK_OK(kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, from_blocks, remote, to_blocks, 4,
                                   (const uint8_t *)reply, strlen(reply), TIMEOUT_MS, &xfer));
    CHECK_OK(kvferry_transfer_wait(xfer));
    uint64_t bytes = 0;
    CHECK_OK(kvferry_transfer_bytes(xfer, &bytes));
    CHECK(bytes == 4 * BLOCK);

    int status = 0;
    CHECK(waitpid(client, &status, 0) == client);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    CHECK_OK(kvferry_transfer_destroy(xfer));
    CHECK_OK(kvferry_descs_destroy(local));
    CHECK_OK(kvferry_descs_destroy(remote));
    CHECK_OK(kvferry_peer_destroy(client_peer));
    CHECK_OK(kvferry_registration_destroy(reg));
    CHECK_OK(kvferry_agent_destroy(agent));
    free(buf);
    printf("two_process: blocks moved both ways between two processes, byte-exact\n");
    return 0;
}

static int connect_and_move(int info_fd) {
    FILE *info = fdopen(info_fd, "r");
    CHECK(info != NULL);
    unsigned port = 0;
    uint64_t server_addr = 0;
    CHECK(fscanf(info, "%u %" SCNu64, &port, &server_addr) == 2);
    fclose(info);

    uint8_t *buf = alloc_blocks();
    memset(buf, 0, (size_t)BLOCKS * BLOCK);
    kvferry_agent agent;
    const char *options[] = {"shm=off", SECRET};
    CHECK_OK(kvferry_agent_create("c-client", options, 2, &agent));
    kvferry_registration reg;
    kvferry_region whole = {.addr = (uintptr_t)buf, .len = (uint64_t)BLOCKS * BLOCK, .mem_kind = KVFERRY_MEM_HOST};
    CHECK_OK(kvferry_register(agent, whole, &reg));

    char address[32];
    snprintf(address, sizeof address, "127.0.0.1:%u", port);
    kvferry_peer server;
    CHECK_OK(kvferry_peer_connect(agent, address, TIMEOUT_MS, &server));
    char name[32];
    size_t name_len = 0;
    CHECK_OK(kvferry_peer_name(server, name, sizeof name, &name_len));
    CHECK(strcmp(name, "c-server") == 0 && name_len == 8);

    kvferry_descs local, remote;
    prepare_lists(agent, server, buf, server_addr, &local, &remote);

    /* READ server blocks 5, 2, 7 into local blocks 0, 1, 2, polling for completion. */
    const size_t read_local[] = {0, 1, 2}, read_remote[] = {5, 2, 7};
    kvferry_transfer xfer;
    CHECK_OK(kvferry_transfer_post(agent, KVFERRY_OP_READ, local, read_local, remote, read_remote, 3, NULL, 0,
                                   TIMEOUT_MS, &xfer));
    bool done = false;
    while (!done) CHECK_OK(kvferry_transfer_poll(xfer, &done));
    CHECK_OK(kvferry_transfer_destroy(xfer));
    for (size_t i = 0; i < 3; i++) CHECK(block_matches(buf + i * BLOCK, BLOCK, 1, read_remote[i]));

    /* WRITE local blocks 8..15 (pattern 2) over the server's blocks 8..15, then say where we are. */
    size_t blocks[8];
    for (size_t i = 0; i < 8; i++) {
        blocks[i] = 8 + i;
        fill_block(buf + blocks[i] * BLOCK, BLOCK, 2, blocks[i]);
    }
    char note[64];
    int note_len = snprintf(note, sizeof note, "written %" PRIu64, (uint64_t)(uintptr_t)buf);
    CHECK_OK(kvferry_transfer_post(agent, KVFERRY_OP_WRITE, local, blocks, remote, blocks, 8, (const uint8_t *)note,
                                   (size_t)note_len, TIMEOUT_MS, &xfer));
    CHECK_OK(kvferry_transfer_wait(xfer));
    CHECK_OK(kvferry_transfer_destroy(xfer));

    /* The server's WRITE lands in blocks 12..15 before its notification arrives. */
    char reply[16];
    take_notification(agent, "c-server", reply, sizeof reply);
    CHECK(strcmp(reply, "reply") == 0);
    for (size_t i = 0; i < 4; i++) CHECK(block_matches(buf + (12 + i) * BLOCK, BLOCK, 1, i));

    /* Destroying the agent releases the peer, lists and registration made from it. */
    CHECK_OK(kvferry_agent_destroy(agent));
    CHECK_STATUS(KVFERRY_ERR_INVALID_HANDLE, kvferry_registration_destroy(reg));
    free(buf);
    return 0;
}

int main(void) {
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(fds[1]);
        return connect_and_move(fds[0]);
    }
    close(fds[0]);
    return serve(fds[1], pid);
}
