/* The cost of going through the C ABI: transfers posted from C over TCP loopback, measured the way
 * `kvferry bench` measures the Rust API (same pairing, same rows), plus the cost of one call.
 * Prints a JSON object; c-api/bench.sh runs it next to `kvferry bench` and compares.
 *
 * Usage: post [seconds per row] */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <kvferry.h>

#define TRY(call)                                                                                        \
    do {                                                                                                 \
        kvferry_status status_ = (call);                                                                 \
        if (status_ != KVFERRY_OK) {                                                                     \
            fprintf(stderr, "%s: %s (%s)\n", #call, kvferry_last_error_message(), kvferry_status_name(status_)); \
            exit(1);                                                                                     \
        }                                                                                                \
    } while (0)

#define MAX_BATCH 64
#define MAX_BLOCK (1024 * 1024)
#define MAX_ITERS 100000

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static kvferry_agent initiator;
static kvferry_peer target_peer;
static unsigned char *local_buf, *remote_buf;
static double latencies[MAX_ITERS];

/* One transfer, timed: post, post to wait returning, and destroy. */
struct timing {
    double post_us, latency_us, destroy_us;
};

static struct timing transfer_once(kvferry_op op, kvferry_descs local, kvferry_descs remote, const size_t *indices,
                                   size_t batch) {
    kvferry_transfer xfer;
    double t0 = now_us();
    TRY(kvferry_transfer_post(initiator, op, local, indices, remote, indices, batch, NULL, 0, 30000, &xfer));
    double t1 = now_us();
    TRY(kvferry_transfer_wait(xfer));
    double t2 = now_us();
    TRY(kvferry_transfer_destroy(xfer));
    return (struct timing){t1 - t0, t2 - t0, now_us() - t2};
}

/* Local block i pairs with remote block batch-1-i, so no two pairs coalesce (as in kvferry bench). */
static void row(kvferry_op op, size_t block, size_t batch, double seconds, int first) {
    kvferry_region local_regions[MAX_BATCH], remote_regions[MAX_BATCH];
    size_t indices[MAX_BATCH];
    for (size_t i = 0; i < batch; i++) {
        local_regions[i] = (kvferry_region){.addr = (uintptr_t)(local_buf + i * block), .len = block};
        remote_regions[i] = (kvferry_region){.addr = (uintptr_t)(remote_buf + (batch - 1 - i) * block), .len = block};
        indices[i] = i;
    }
    kvferry_descs local, remote;
    TRY(kvferry_descs_prepare_local(initiator, local_regions, batch, &local));
    TRY(kvferry_descs_prepare_remote(target_peer, remote_regions, batch, &remote));

    transfer_once(op, local, remote, indices, batch); /* warm-up: connections open on first use */
    double post_total = 0, destroy_total = 0;
    size_t n = 0;
    double started = now_us();
    while (n < MAX_ITERS && (n < 3 || now_us() - started < seconds * 1e6)) {
        struct timing t = transfer_once(op, local, remote, indices, batch);
        post_total += t.post_us;
        destroy_total += t.destroy_us;
        latencies[n++] = t.latency_us;
    }
    double total = now_us() - started, lat_sum = 0;
    for (size_t i = 0; i < n; i++) lat_sum += latencies[i];
    qsort(latencies, n, sizeof latencies[0], by_value);
    printf("%s    {\"op\": \"%s\", \"block_size\": %zu, \"batch\": %zu, \"iterations\": %zu, \"gbps\": %.4f, "
           "\"lat_avg_us\": %.2f, \"lat_p99_us\": %.2f, \"post_avg_us\": %.3f, \"destroy_avg_us\": %.3f}",
           first ? "" : ",\n", op == KVFERRY_OP_READ ? "read" : "write", block, batch, n,
           (double)block * batch * n / (total * 1e3), lat_sum / n, latencies[n * 99 / 100], post_total / n,
           destroy_total / n);
    TRY(kvferry_descs_destroy(local));
    TRY(kvferry_descs_destroy(remote));
}

/* Nanoseconds per call of the cheapest call on a live handle, and of a call that fails (which
 * formats its message). */
static void call_costs(void) {
    kvferry_descs local, remote;
    kvferry_region one = {.addr = (uintptr_t)local_buf, .len = 4096};
    kvferry_region theirs = {.addr = (uintptr_t)remote_buf, .len = 4096};
    TRY(kvferry_descs_prepare_local(initiator, &one, 1, &local));
    TRY(kvferry_descs_prepare_remote(target_peer, &theirs, 1, &remote));
    const size_t zero = 0;
    kvferry_transfer xfer;
    TRY(kvferry_transfer_post(initiator, KVFERRY_OP_READ, local, &zero, remote, &zero, 1, NULL, 0, 30000, &xfer));
    TRY(kvferry_transfer_wait(xfer));
    const int calls = 1000000;
    uint64_t bytes = 0, sum = 0;
    double t0 = now_us();
    for (int i = 0; i < calls; i++) {
        TRY(kvferry_transfer_bytes(xfer, &bytes));
        sum += bytes;
    }
    double ok_ns = (now_us() - t0) * 1e3 / calls;
    kvferry_transfer invalid = {0};
    t0 = now_us();
    for (int i = 0; i < calls; i++) sum += (uint64_t)kvferry_transfer_bytes(invalid, &bytes);
    double err_ns = (now_us() - t0) * 1e3 / calls;
    if (sum == 0) exit(1);
    printf("  \"call_ns\": {\"transfer_bytes\": %.1f, \"invalid_handle\": %.1f},\n", ok_ns, err_ns);
    TRY(kvferry_transfer_destroy(xfer));
    TRY(kvferry_descs_destroy(local));
    TRY(kvferry_descs_destroy(remote));
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    size_t len = (size_t)MAX_BATCH * MAX_BLOCK;
    local_buf = aligned_alloc(4096, len);
    remote_buf = aligned_alloc(4096, len);
    if (local_buf == NULL || remote_buf == NULL) return 1;
    memset(local_buf, 1, len);
    memset(remote_buf, 2, len);

    kvferry_agent target;
    const char *options[] = {"tcp.streams=2"};
    TRY(kvferry_agent_create("bench-target", options, 1, &target));
    TRY(kvferry_agent_create("bench-initiator", options, 1, &initiator));
    kvferry_registration regs[2];
    TRY(kvferry_register(target, (kvferry_region){.addr = (uintptr_t)remote_buf, .len = len}, &regs[0]));
    TRY(kvferry_register(initiator, (kvferry_region){.addr = (uintptr_t)local_buf, .len = len}, &regs[1]));
    uint16_t port;
    TRY(kvferry_side_channel_serve(target, "127.0.0.1:0", &port));
    char address[32];
    snprintf(address, sizeof address, "127.0.0.1:%u", port);
    TRY(kvferry_peer_connect(initiator, address, 5000, &target_peer));

    printf("{\n");
    call_costs();
    printf("  \"rows\": [\n");
    const size_t blocks[] = {4096, 16384, 1024 * 1024}, batches[] = {1, 64};
    int first = 1;
    for (int op = 0; op < 2; op++) {
        for (size_t b = 0; b < 3; b++) {
            for (size_t k = 0; k < 2; k++) {
                row(op == 0 ? KVFERRY_OP_READ : KVFERRY_OP_WRITE, blocks[b], batches[k], seconds, first);
                first = 0;
            }
        }
    }
    printf("\n  ]\n}\n");
    TRY(kvferry_agent_destroy(initiator));
    TRY(kvferry_agent_destroy(target));
    free(local_buf);
    free(remote_buf);
    return 0;
}
