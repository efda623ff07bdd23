"""The vLLM connector's pieces that need no vLLM: cache layouts read from tensors, the head mapping
between tensor-parallel sizes (moved by real agents), the side channel and the settings."""

import json
import socket
import struct
import threading

import pytest

import kvferry
from kvferry import authenticate_socket
from kvferry.vllm.config import GIB, ConnectorConfig
from kvferry.vllm.handshake import HandshakeError, HandshakeServer, RankInfo, fetch
from kvferry.vllm.layout import (
    KvLayout,
    LayoutError,
    coalesce,
    describe_layer,
    head_range,
    read_plan,
    sources,
)

BLOCKS, HEADS, TOKENS, DIM = 6, 4, 8, 16


def test_block_major_layout_is_one_segment_a_block(torch):
    # [B, 2, H, N, C]: K and V of a block are one run.
    t = torch.zeros(BLOCKS, 2, HEADS, TOKENS, DIM)
    layer = describe_layer("l0", t, BLOCKS, HEADS)
    per_block = 2 * HEADS * TOKENS * DIM * 4
    assert layer.offsets == (0,) and layer.segment_len == per_block and layer.block_stride == per_block
    assert layer.segments(3) == [(t.data_ptr() + 3 * per_block, per_block)]


def test_kv_outer_layout_has_a_segment_for_k_and_one_for_v(torch):
    # [2, B, H, N, C] (K/V outermost): a block is two runs, num_blocks apart.
    t = torch.zeros(2, BLOCKS, HEADS, TOKENS, DIM)
    layer = describe_layer("l0", t, BLOCKS, HEADS)
    run = HEADS * TOKENS * DIM * 4
    assert layer.offsets == (0, BLOCKS * run) and layer.segment_len == run
    assert layer.head_len == TOKENS * DIM * 4


def test_token_major_blocks_cannot_be_sliced_by_head(torch):
    # Logical [B, H, N, C] over physical [B, N, H, C] (NHD): heads are not outermost in a block.
    t = torch.zeros(BLOCKS, TOKENS, HEADS, DIM).permute(0, 2, 1, 3)
    layer = describe_layer("l0", t, BLOCKS, HEADS)
    assert layer.head_len is None and layer.segment_len == HEADS * TOKENS * DIM * 4


def test_cross_layer_blocks_merge_into_one_region(torch):
    # One buffer [B, L, H, N, C] with a per-layer view each: a block's layers are adjacent.
    buf = torch.zeros(BLOCKS, 3, HEADS, TOKENS, DIM)
    layout = KvLayout([describe_layer(f"l{i}", buf[:, i], BLOCKS, HEADS) for i in range(3)], TOKENS, BLOCKS)
    per_layer = HEADS * TOKENS * DIM * 4
    assert layout.block_bytes == 3 * per_layer
    assert layout.block_regions(2) == [(buf.data_ptr() + 2 * 3 * per_layer, 3 * per_layer)]


def test_tensors_that_are_not_paged_blocks_are_refused(torch):
    with pytest.raises(LayoutError, match="no axis of 7 blocks"):
        describe_layer("l0", torch.zeros(BLOCKS, 2, HEADS), 7)
    # Every other channel: a block's bytes are not one run.
    with pytest.raises(LayoutError, match="not contiguous"):
        describe_layer("l0", torch.zeros(BLOCKS, HEADS, 2 * DIM)[:, :, ::2], BLOCKS)


def test_layouts_survive_their_wire_form_and_refuse_garbage(torch):
    layout = KvLayout([describe_layer("l0", torch.zeros(2, BLOCKS, HEADS, TOKENS, DIM), BLOCKS, HEADS)], TOKENS, BLOCKS)
    again = KvLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again.layers == layout.layers and again.block_bytes == layout.block_bytes
    with pytest.raises(LayoutError):
        KvLayout.from_dict({"layers": [{"name": "x"}], "block_tokens": 1, "num_blocks": 1})


def test_head_ranges_split_and_replicate():
    assert [head_range(r, 2, 8) for r in range(2)] == [(0, 4), (4, 8)]
    # Fewer heads than ranks: each head lives on several ranks.
    assert [head_range(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(LayoutError):
        head_range(0, 3, 8)
    # A rank reads each head range once, from its first holder.
    assert sources(0, 1, 8, {0: (2, 8), 1: (2, 8)}) == [0, 1]
    assert sources(1, 2, 2, {r: (4, 2) for r in range(4)}) == [2]


def test_coalesce_merges_only_runs_adjacent_on_both_sides():
    pairs = [((100, 10), (500, 10)), ((110, 10), (510, 10)), ((120, 10), (600, 10))]
    assert coalesce(pairs) == [((100, 20), (500, 20)), ((120, 10), (600, 10))]


def _rank_caches(torch, tp: int, seed: int):
    """Each rank's [2, B, H/tp, N, C] cache, filled from one full-head cache."""
    full = torch.randn(2, BLOCKS, HEADS, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))
    return full, [full[:, :, slice(*head_range(r, tp, HEADS))].contiguous() for r in range(tp)]


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2), (2, 2)])
def test_blocks_move_between_tensor_parallel_sizes_by_head(torch, prefill_tp, decode_tp):
    full, prefill = _rank_caches(torch, prefill_tp, seed=prefill_tp * 10 + decode_tp)
    decode = [torch.zeros_like(full[:, :, slice(*head_range(r, decode_tp, HEADS))]) for r in range(decode_tp)]
    agents_p = [kvferry.Agent(f"p{r}", shm=False) for r in range(prefill_tp)]
    agents_d = [kvferry.Agent(f"d{r}", shm=False) for r in range(decode_tp)]
    regs = [a.register(t) for a, t in zip(agents_p + agents_d, prefill + decode)]

    def layout(t, tp):
        return KvLayout([describe_layer("l0", t, BLOCKS, HEADS // tp)], TOKENS, BLOCKS)

    remote_blocks, local_blocks = [1, 2, 4], [5, 0, 3]
    holders = {r: (prefill_tp, HEADS) for r in range(prefill_tp)}
    for d, agent in enumerate(agents_d):
        for p in sources(d, decode_tp, HEADS, holders):
            peer = agent.add_peer(agents_p[p].metadata())
            pairs = read_plan(
                layout(decode[d], decode_tp),
                head_range(d, decode_tp, HEADS),
                layout(prefill[p], prefill_tp),
                head_range(p, prefill_tp, HEADS),
                local_blocks,
                remote_blocks,
            )
            local = agent.prepare_local([x[0] for x in pairs])
            remote = agent.prepare_remote(peer, [x[1] for x in pairs])
            idx = list(range(len(pairs)))
            agent.read(local, idx, remote, idx).wait(10)
    for d in range(decode_tp):
        heads = slice(*head_range(d, decode_tp, HEADS))
        for lb, rb in zip(local_blocks, remote_blocks):
            assert torch.equal(decode[d][:, lb], full[:, rb, heads])
        untouched = [b for b in range(BLOCKS) if b not in local_blocks]
        assert not decode[d][:, untouched].any()
    del regs


def test_layouts_that_cannot_meet_are_refused(torch):
    a = KvLayout([describe_layer("l0", torch.zeros(2, BLOCKS, 2, TOKENS, DIM), BLOCKS, 2)], TOKENS, BLOCKS)
    nhd = torch.zeros(2, BLOCKS, TOKENS, 4, DIM).permute(0, 1, 3, 2, 4)
    b = KvLayout([describe_layer("l0", nhd, BLOCKS, 4)], TOKENS, BLOCKS)
    with pytest.raises(LayoutError, match="heads outermost"):
        read_plan(a, (0, 2), b, (0, 4), [0], [0])
    other_tokens = KvLayout(a.layers, TOKENS * 2, BLOCKS)
    with pytest.raises(LayoutError, match="block of"):
        read_plan(a, (0, 2), other_tokens, (0, 2), [0], [0])


# The secret of the environment (conftest.py sets KVFERRY_SECRET).
ENV_AUTH = {"auth": "env"}


def _info(torch) -> RankInfo:
    # Two KV cache groups (a full attention layer and a sliding window one, say).
    groups = [
        KvLayout([describe_layer(f"l{i}", torch.zeros(2, BLOCKS, HEADS, TOKENS, DIM), BLOCKS, HEADS)], TOKENS, BLOCKS)
        for i in range(2)
    ]
    return RankInfo("engine-1", 0, 1, HEADS, b"\x00metadata\xff", tuple(groups))


def test_side_channel_serves_every_rank(torch):
    info = _info(torch)
    server = HandshakeServer("127.0.0.1", 0, {0: info}, ENV_AUTH)
    try:
        got = fetch(server.host, server.port, 5, ENV_AUTH)
        assert got[0].agent_metadata == info.agent_metadata
        assert [g.layers for g in got[0].layouts] == [g.layers for g in info.layouts]
        assert got[0].layouts[0].layers != got[0].layouts[1].layers
    finally:
        server.close()


def test_side_channel_serves_only_engines_that_prove_the_secret(torch):
    info = _info(torch)
    server = HandshakeServer("127.0.0.1", 0, {0: info}, ENV_AUTH)
    try:
        # A raw client gets the handshake's refusal and not a byte of the document.
        with socket.create_connection((server.host, server.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
            reply = raw.recv(1 << 16)
            assert reply.startswith(b"KVFA") and b"metadata" not in reply
        for other in ({"secret": "another cluster's secret, long"}, {"auth": "none"}):
            with pytest.raises(HandshakeError, match="505|not authenticated"):
                fetch(server.host, server.port, 5, other)
        assert fetch(server.host, server.port, 5, ENV_AUTH)[0].agent_metadata == info.agent_metadata
    finally:
        server.close()
    # And a decode engine does not trust a side channel that cannot prove the secret.
    impostor = HandshakeServer("127.0.0.1", 0, {0: info}, {"secret": "an impostor's secret, long enough"})
    try:
        with pytest.raises(HandshakeError, match="505|not authenticated"):
            fetch(impostor.host, impostor.port, 5, ENV_AUTH)
    finally:
        impostor.close()


def _serve_once(payload: bytes) -> int:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn, listener:
            authenticate_socket(conn.fileno(), "server", 5)
            conn.sendall(payload)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # closed at once
        struct.pack(">I", 100) + b"{}",  # truncated
        struct.pack(">I", 2) + b"{}",  # not a kvferry side channel
        struct.pack(">I", 9) + b"not json!",
        struct.pack(">I", 1 << 30),  # absurd size
        struct.pack(">I", 38) + b'{"version": 1, "ranks": {"x": {"a": 1}}}'[:38],
    ],
)
def test_side_channel_answers_that_are_not_handshakes_are_typed_errors(payload):
    with pytest.raises(HandshakeError):
        fetch("127.0.0.1", _serve_once(payload), 5, ENV_AUTH)


def test_an_unreachable_side_channel_is_a_typed_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HandshakeError):
        fetch("127.0.0.1", port, 2, ENV_AUTH)


def test_settings_from_extra_config():
    cfg = ConnectorConfig.from_extra("e", "kv_both", {"offload": {"dram_gib": 2, "disk_dir": "/x", "disk_gib": 1}})
    assert cfg.pd and cfg.offload.dram_bytes == 2 * GIB and cfg.offload.disk_bytes == GIB
    offload_only = ConnectorConfig.from_extra("e", "kv_both", {"pd": False, "offload": {}})
    assert not offload_only.pd and offload_only.offload.dram_bytes == 4 * GIB
    # A restarted engine keeps what its disk holds unless told to empty it.
    assert not cfg.offload.clear_on_start
    assert ConnectorConfig.from_extra("e", "kv_both", {"offload": {"clear_on_start": True}}).offload.clear_on_start
    # The agent's own options pass through to kvferry.Agent, which checks them.
    options = {"fabric.domains": "eth1", "tcp.streams": 4}
    assert ConnectorConfig.from_extra("e", "kv_both", {"agent_options": options}).agent_options == options
    assert ConnectorConfig.from_extra("e", "kv_both", {}).agent_options == {}
    for bad in (
        {"pd": False},
        {"lease_seconds": 0},
        {"port": -1},
        {"unknown": 1},
        {"offload": {"disk_dir": "/x"}},
        {"offload": {"dram_bytes": "lots"}},
        {"offload": 3},
        {"offload": {"clear_on_start": "yes"}},
        {"agent_options": ["fabric.domains"]},
    ):
        with pytest.raises(ValueError):
            ConnectorConfig.from_extra("e", "kv_both", bad)
