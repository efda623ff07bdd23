// A C++ engine's view of kvferry: handles owned by RAII types, errors as exceptions. A prefill and
// a decode agent (in one process here) find each other through the side channel; the decode side
// reads KV blocks and tells the prefill side it may free them.
#include <kvferry.h>

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Every kvferry call returns a status; on failure the thread's last error message says why.
void check(kvferry_status status, const char *what) {
    if (status != KVFERRY_OK) {
        throw std::runtime_error(std::string(what) + ": " + kvferry_last_error_message() + " (" +
                                 kvferry_status_name(status) + ")");
    }
}

// An agent; destroying it releases every handle made from it (registrations, peers, lists,
// transfers), after which kvferry no longer touches their memory.
class Agent {
  public:
    Agent(const char *name, std::vector<const char *> options = {}) {
        check(kvferry_agent_create(name, options.empty() ? nullptr : options.data(), options.size(), &handle_),
              "kvferry_agent_create");
    }
    ~Agent() { kvferry_agent_destroy(handle_); }
    Agent(const Agent &) = delete;
    Agent &operator=(const Agent &) = delete;
    kvferry_agent get() const { return handle_; }

  private:
    kvferry_agent handle_{};
};

constexpr std::size_t kBlock = 64 * 1024;
constexpr std::size_t kBlocks = 16;

// KV blocks in page-aligned host memory, and descriptors of each block.
struct Blocks {
    explicit Blocks(unsigned char fill)
        : bytes(static_cast<unsigned char *>(std::aligned_alloc(4096, kBlock * kBlocks)), &std::free) {
        if (!bytes) throw std::bad_alloc();
        std::memset(bytes.get(), fill, kBlock * kBlocks);
    }
    kvferry_region whole() const {
        return kvferry_region{reinterpret_cast<uintptr_t>(bytes.get()), kBlock * kBlocks, KVFERRY_MEM_HOST, 0};
    }
    std::vector<kvferry_region> each() const {
        std::vector<kvferry_region> regions;
        for (std::size_t i = 0; i < kBlocks; i++) {
            regions.push_back(kvferry_region{reinterpret_cast<uintptr_t>(bytes.get() + i * kBlock), kBlock,
                                             KVFERRY_MEM_HOST, 0});
        }
        return regions;
    }
    std::unique_ptr<unsigned char, decltype(&std::free)> bytes;
};

}  // namespace

int main() {
    try {
        if (kvferry_abi_version() != KVFERRY_ABI_VERSION) {
            throw std::runtime_error(std::string("libkvferry ") + kvferry_version() + " does not match this header");
        }
        // The memory outlives the agents (declared first, destroyed last).
        Blocks kv(0xAB), dst(0);
        Agent prefill("prefill-0");
        Agent decode("decode-0", {"tcp.streams=2"});

        kvferry_registration kv_reg, dst_reg;
        check(kvferry_register(prefill.get(), kv.whole(), &kv_reg), "kvferry_register");
        check(kvferry_register(decode.get(), dst.whole(), &dst_reg), "kvferry_register");
        uint16_t port = 0;
        check(kvferry_side_channel_serve(prefill.get(), "127.0.0.1:0", &port), "kvferry_side_channel_serve");
        const std::string address = "127.0.0.1:" + std::to_string(port);
        kvferry_peer peer;
        check(kvferry_peer_connect(decode.get(), address.c_str(), 5000, &peer), "kvferry_peer_connect");

        kvferry_descs local, remote;
        auto mine = dst.each(), theirs = kv.each();
        check(kvferry_descs_prepare_local(decode.get(), mine.data(), mine.size(), &local), "prepare_local");
        check(kvferry_descs_prepare_remote(peer, theirs.data(), theirs.size(), &remote), "prepare_remote");

        // Prefill blocks 7, 3, 9 into local blocks 0, 1, 2, by a 5 s deadline; the note reaches the
        // prefill side once the data is in place.
        const std::size_t local_blocks[] = {0, 1, 2}, remote_blocks[] = {7, 3, 9};
        const std::string note = "req-42:done";
        kvferry_transfer transfer;
        check(kvferry_transfer_post(decode.get(), KVFERRY_OP_READ, local, local_blocks, remote, remote_blocks, 3,
                                    reinterpret_cast<const uint8_t *>(note.data()), note.size(), 5000, &transfer),
              "kvferry_transfer_post");
        check(kvferry_transfer_wait(transfer), "kvferry_transfer_wait");
        for (std::size_t i = 0; i < 3 * kBlock; i++) {
            if (dst.bytes.get()[i] != 0xAB) throw std::runtime_error("byte " + std::to_string(i) + " did not arrive");
        }
        if (dst.bytes.get()[3 * kBlock] != 0) throw std::runtime_error("a byte past the three blocks changed");

        char from[64];
        unsigned char data[64];
        std::size_t from_len = 0, data_len = 0;
        check(kvferry_notification_take(prefill.get(), 5000, from, sizeof from, &from_len, data, sizeof data,
                                        &data_len),
              "kvferry_notification_take");
        if (std::string(reinterpret_cast<char *>(data), data_len) != note) throw std::runtime_error("wrong note");
        uint64_t bytes = 0;
        check(kvferry_transfer_bytes(transfer, &bytes), "kvferry_transfer_bytes");
        std::printf("%s says %.*s; moved %llu bytes\n", from, static_cast<int>(data_len),
                    reinterpret_cast<const char *>(data), static_cast<unsigned long long>(bytes));
        return bytes == 3 * kBlock ? 0 : 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
