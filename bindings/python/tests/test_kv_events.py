"""The tier store's KV events as a router receives them: a ZMQ subscriber on the store's publisher,
each batch decoded by vLLM's own msgspec classes and by an independent decoder that reads them as
llm-d's vLLM adapter does (positional fields, hashes as unsigned 64-bit integers), through a put,
a move to disk, a clear and a replay."""

import hashlib
import struct
import time

import pytest

import kvferry
from conftest import pattern

BLOCK = 4096
BLOCK_TOKENS = 16
POD, MODEL = "pod-0", "org/model"
TOPIC = f"kv@{POD}@{MODEL}".encode()
# Engine block hashes as vLLM's integer form, the top bit set in some.
ENGINE_HASHES = [(0x9E3779B97F4A7C15 * (i + 1)) % 2**64 for i in range(3)]


def vllm_events():
    """vLLM's event classes and msgspec, or a skip saying why."""
    try:
        import msgspec
        from vllm.distributed import kv_events
    except ImportError as e:
        pytest.skip(f"vLLM is not installed here ({e}); the KV event tests decode with its classes")
    return kv_events, msgspec


def zmq_and_msgpack():
    try:
        import msgpack
        import zmq
    except ImportError as e:
        pytest.skip(f"pyzmq or msgpack is not installed here ({e})")
    return zmq, msgpack


def publish(store, endpoint, **kwargs):
    """The store's publisher, or a skip where this build has no kv-events feature."""
    try:
        return store.publish_events(endpoint, BLOCK_TOKENS, **kwargs)
    except kvferry.UnsupportedError as e:
        pytest.skip(f"this build of kvferry publishes no KV events: {e}")


def u64_hash(raw):
    """llm-d's getHashAsUint64: an int as it is, bytes by their last eight bytes big-endian (fewer
    zero-padded on the left)."""
    if isinstance(raw, int):
        return raw % 2**64
    if isinstance(raw, bytes) and raw:
        return int.from_bytes(raw[-8:].rjust(8, b"\0"), "big")
    raise AssertionError(f"unsupported hash {raw!r}")


# The fields llm-d's adapter decodes, in its structs' order (msgpackVLLMBlockStoredEvent, ...),
# after the tag.
LLMD_FIELDS = {
    "BlockStored": [
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ],
    "BlockRemoved": ["block_hashes", "medium"],
    "AllBlocksCleared": [],
}


def llmd_decode(msgpack, frames):
    """(pod, model, [(tag, hashes, medium), ...]) of one message, decoded without vLLM's classes.

    llm-d reads `[topic, seq, payload]`, the pod and the model from `kv@<pod>@<model>`, a batch
    `[ts, events, dp_rank]`, and each event as its tag followed by positional fields. vLLM 0.32
    encodes an event as a map in the struct's field order, so its entries are read in that order:
    the first is the tag, then llm-d's fields, then only fields llm-d does not know (vLLM's newer
    ones, at their end)."""
    assert len(frames) == 3, "vLLM's 3-part message"
    topic, seq, payload = frames
    assert len(seq) == 8, "an 8-byte big-endian sequence number"
    parts = topic.decode().split("@")
    assert len(parts) == 3 and parts[0] == "kv", topic
    batch = msgpack.unpackb(payload, raw=False, object_pairs_hook=list, strict_map_key=False)
    ts, events, _rank = batch
    assert isinstance(ts, float)
    decoded = []
    for pairs in events:
        (tag_key, tag), *fields = pairs
        assert tag_key == "type"
        names = LLMD_FIELDS[tag]
        assert [k for k, _ in fields[: len(names)]] == names, f"{tag} fields out of llm-d's order: {fields}"
        assert not set(k for k, _ in fields[len(names) :]) & set(names)
        values = dict(fields)
        hashes = [u64_hash(h) for h in values.get("block_hashes", [])]
        if tag == "BlockStored":
            # A token-less tier update: llm-d applies it to the engine keys it already knows.
            assert values["token_ids"] == [] and values["parent_block_hash"] is None
            assert values["block_size"] == BLOCK_TOKENS
        decoded.append((tag, hashes, values.get("medium")))
    return parts[1], parts[2], decoded


def vllm_decode(kv_events, msgspec, payload):
    """The same triples, from vLLM's own decoder."""
    batch = msgspec.msgpack.Decoder(kv_events.KVEventBatch).decode(payload)
    decoded = []
    for event in batch.events:
        if isinstance(event, kv_events.AllBlocksCleared):
            decoded.append(("AllBlocksCleared", [], None))
            continue
        assert event.locality == "LOCAL", event
        if isinstance(event, kv_events.BlockStored):
            assert event.token_ids == [] and event.parent_block_hash is None and event.block_size == BLOCK_TOKENS
            assert event.lora_id is None and event.lora_name is None
        assert all(isinstance(h, int) for h in event.block_hashes), "vLLM's default integer hashes"
        decoded.append((type(event).__name__, list(event.block_hashes), event.medium))
    return batch, decoded


def put(store, keys, ids):
    source = pattern(len(ids) * BLOCK, ids[0])
    base = source.ctypes.data
    store.put([(keys[i], [(base + n * BLOCK, BLOCK)]) for n, i in enumerate(ids)]).wait(30)


def test_routers_decode_a_put_a_move_a_clear_and_a_replay(tmp_path):
    kv_events, msgspec = vllm_events()
    zmq, msgpack = zmq_and_msgpack()
    keys = [kvferry.engine_key(h) for h in ENGINE_HASHES]
    context = zmq.Context()
    # As llm-d's indexer runs centrally: it binds, and engines (and the store) connect.
    sub = context.socket(zmq.SUB)
    sub.bind("tcp://127.0.0.1:*")
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    endpoint = sub.getsockopt(zmq.LAST_ENDPOINT).decode()
    store = kvferry.TierStore(BLOCK, 2 * BLOCK, disk_dir=tmp_path, disk_capacity=8 * BLOCK, admit_after=0, pin=False)
    publisher = publish(
        store, endpoint, pod=POD, model=MODEL, replay_endpoint="tcp://127.0.0.1:*", data_parallel_rank=0
    )
    try:
        assert publisher.topic == TOPIC.decode() and publisher.replay_endpoint.startswith("tcp://127.0.0.1:")
        # A PUB drops what it sends until the subscriber is connected: put probe blocks until one's
        # event arrives, then clear and let the probes' events drain.
        probes = [kvferry.engine_key(10_000 + i) for i in range(100)]
        last_seq = None
        for probe in probes:
            put(store, [probe], [0])
            if sub.poll(200):
                last_seq = struct.unpack(">Q", sub.recv_multipart()[1])[0]
                break
        assert last_seq is not None, "the subscriber connected within 20 s"
        store.clear()
        while sub.poll(500):
            last_seq = struct.unpack(">Q", sub.recv_multipart()[1])[0]
        first_seq = last_seq + 1

        put(store, keys, [0, 1])  # Stored(CPU) 0, 1
        put(store, keys, [2])  # DRAM holds two: 0 moves to disk, then Stored(CPU) 2
        store.clear()  # Removed(CPU) 1, 2; Removed(STORAGE) 0; AllBlocksCleared

        messages, llmd, vllm = [], [], []
        deadline = time.monotonic() + 20
        while not any(tag == "AllBlocksCleared" for tag, _, _ in llmd):
            assert time.monotonic() < deadline, f"no clear arrived: {llmd}"
            if not sub.poll(1000):
                continue
            frames = sub.recv_multipart()
            assert frames[0] == TOPIC
            assert struct.unpack(">Q", frames[1])[0] == first_seq + len(messages), "sequence numbers count batches"
            messages.append(frames)
            pod, model, events = llmd_decode(msgpack, frames)
            assert (pod, model) == (POD, MODEL)
            llmd.extend(events)
            batch, events = vllm_decode(kv_events, msgspec, frames[2])
            assert batch.data_parallel_rank == 0 and abs(time.time() - batch.ts) < 60
            vllm.extend(events)
        assert vllm == llmd, "the two decoders read the same events"

        h = ENGINE_HASHES
        assert llmd[:4] == [
            ("BlockStored", [h[0], h[1]], "CPU"),
            ("BlockRemoved", [h[0]], "CPU"),
            ("BlockStored", [h[0]], "STORAGE"),
            ("BlockStored", [h[2]], "CPU"),
        ]
        # The clear: its removals in either order, blocks within one in any, then the clear.
        removals = sorted((tag, sorted(hashes), medium) for tag, hashes, medium in llmd[4:6])
        assert removals == sorted([("BlockRemoved", sorted([h[1], h[2]]), "CPU"), ("BlockRemoved", [h[0]], "STORAGE")])
        assert llmd[6:] == [("AllBlocksCleared", [], None)]

        # A subscriber that missed batches asks for them from the second on, as vLLM's replay
        # client does; the answers are what the PUB socket sent, then the end marker.
        replay = context.socket(zmq.DEALER)
        replay.connect(publisher.replay_endpoint)
        replay.send_multipart([b"", struct.pack(">Q", first_seq + 1)])
        for frames in messages[1:]:
            assert replay.poll(10_000)
            assert replay.recv_multipart() == [b"", *frames]
        assert replay.poll(10_000)
        assert replay.recv_multipart() == [b"", b"", struct.pack(">q", -1), b""]
        replay.close(linger=0)
    finally:
        publisher.close()
        store.close()
        sub.close(linger=0)
        context.term()
    assert publisher.closed


def test_hashes_as_bytes_and_no_locality_on_a_raw_topic(tmp_path):
    kv_events, msgspec = vllm_events()
    zmq, msgpack = zmq_and_msgpack()
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    with kvferry.TierStore(BLOCK, 4 * BLOCK, pin=False) as store:
        # The store binds here, as vLLM does with a wildcard, and the subscriber connects.
        with publish(store, "tcp://127.0.0.1:*", topic="raw", hashes="bytes", locality=None) as publisher:
            sub.connect(publisher.endpoint)
            # 32-byte keys, as vLLM's sha256 block hashes are.
            for n in range(100):
                put(store, [kvferry.engine_key(hashlib.sha256(bytes([n])).digest())], [0])
                if sub.poll(200):
                    break
            assert sub.poll(0), "the subscriber connected within 20 s"
            frames = sub.recv_multipart()
        assert publisher.closed
    sub.close(linger=0)
    context.term()
    assert frames[0] == b"raw"
    batch = msgspec.msgpack.Decoder(kv_events.KVEventBatch).decode(frames[2])
    stored = batch.events[0]
    assert isinstance(stored, kv_events.BlockStored) and stored.locality is None
    assert stored.medium == kv_events.MEDIUM_CPU
    assert isinstance(stored.block_hashes[0], bytes) and len(stored.block_hashes[0]) == 32
    assert batch.data_parallel_rank is None
    # llm-d reads a bytes hash by its last eight bytes.
    assert llmd_decode(msgpack, [b"kv@p@m", *frames[1:]])[2][0][1] == [u64_hash(stored.block_hashes[0])]


def test_bad_settings_are_typed_errors():
    with kvferry.TierStore(BLOCK, 4 * BLOCK, pin=False) as store:
        publish(store, "inproc://kvferry-settings").close()
        with pytest.raises(kvferry.InvalidArgumentError, match="hash form"):
            store.publish_events("inproc://a", BLOCK_TOKENS, hashes="hex")
        with pytest.raises(kvferry.InvalidArgumentError, match="locality"):
            store.publish_events("inproc://a", BLOCK_TOKENS, locality="local")
        with pytest.raises(kvferry.InvalidArgumentError, match="'@'"):
            store.publish_events("inproc://a", BLOCK_TOKENS, pod="a@b", model="m")
        with pytest.raises(ValueError, match="pod and model"):
            store.publish_events("inproc://a", BLOCK_TOKENS, pod="p")
        with pytest.raises(kvferry.KvferryError, match="bogus://x"):
            store.publish_events("bogus://x", BLOCK_TOKENS)


def test_the_media_are_spelled_as_vllm_spells_them():
    kv_events, _ = vllm_events()
    assert kvferry.KV_EVENT_MEDIUM == {
        "GPU": kv_events.MEDIUM_GPU,
        "CPU": kv_events.MEDIUM_CPU,
        "DISK": kv_events.MEDIUM_STORAGE,
        "REMOTE": kv_events.MEDIUM_STORAGE,
    }
