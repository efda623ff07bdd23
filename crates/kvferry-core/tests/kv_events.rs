//! A tier store's events received by a real ZMQ subscriber and decoded with a msgpack library, in
//! the shape vLLM's KV event subscribers (and routers built on them) decode.
#![cfg(feature = "kv-events")]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvferry_core::memory::host::HostBuffer;
use kvferry_core::tier::kv_events::{KvEventPublisher, KvEventsConfig, zmq};
use kvferry_core::tier::{BlockKey, DiskConfig, TierConfig, TierStore};
use kvferry_core::{Deadline, Device, HostAllocOptions, HostDevice, MemRegion};
use rmpv::Value;

const BLOCK: usize = 4096;
const UNPINNED: HostAllocOptions = HostAllocOptions::new().with_pin(false);

/// A 32-byte engine hash (vLLM's sha256 block hashes have this length), distinct per block.
fn hash(i: u8) -> Vec<u8> {
    (0..32).map(|b| i.wrapping_mul(31).wrapping_add(b)).collect()
}

fn put(store: &TierStore, ids: &[u8]) {
    let buf = HostBuffer::alloc(ids.len() * BLOCK, &UNPINNED).unwrap();
    let blocks = ids
        .iter()
        .enumerate()
        .map(|(n, &i)| {
            let key = BlockKey::from_engine_hash(&hash(i)).unwrap();
            (key, vec![MemRegion::host(buf.as_ptr().wrapping_add(n * BLOCK), BLOCK)])
        })
        .collect();
    let host: Arc<dyn Device> = Arc::new(HostDevice::with_threads(1).unwrap());
    // SAFETY: `buf` outlives the wait.
    unsafe { store.put(host, blocks) }.unwrap().wait(Deadline::after(Duration::from_secs(30))).unwrap();
}

/// vLLM's integer form of block `i`'s hash: its last eight bytes, big-endian.
fn int_hash(i: u8) -> u64 {
    u64::from_be_bytes(hash(i)[24..].try_into().unwrap())
}

/// (tag, hashes, medium) of one decoded event, after checking its fields' shapes and order.
fn event(v: &Value) -> (String, Vec<u64>, String) {
    let names: Vec<&str> = v.as_map().unwrap().iter().map(|(k, _)| k.as_str().unwrap()).collect();
    let fields: std::collections::HashMap<&str, &Value> = v
        .as_map()
        .expect("an event is a tagged map")
        .iter()
        .map(|(k, v)| (k.as_str().expect("field names are strings"), v))
        .collect();
    let tag = fields["type"].as_str().unwrap().to_string();
    if tag == "AllBlocksCleared" {
        assert_eq!(names, ["type"]);
        return (tag, Vec::new(), String::new());
    }
    let hashes = fields["block_hashes"].as_array().unwrap().iter().map(|h| h.as_u64().expect("hashes are ints"));
    assert_eq!(fields["locality"].as_str(), Some("LOCAL"), "{v}");
    match tag.as_str() {
        "BlockStored" => {
            // The order vLLM's BlockStored declares them in; what vLLM leaves at its default
            // between lora_name and locality is omitted.
            let order = [
                "type",
                "block_hashes",
                "parent_block_hash",
                "token_ids",
                "block_size",
                "lora_id",
                "medium",
                "lora_name",
                "locality",
            ];
            assert_eq!(names, order, "{v}");
            assert!(fields["parent_block_hash"].is_nil(), "no parent hash: {v}");
            assert_eq!(fields["token_ids"].as_array().map(Vec::len), Some(0), "no token ids: {v}");
            assert_eq!(fields["block_size"].as_u64(), Some(16), "block_size in tokens: {v}");
            assert!(fields["lora_id"].is_nil() && fields["lora_name"].is_nil(), "no LoRA: {v}");
        }
        "BlockRemoved" => assert_eq!(names, ["type", "block_hashes", "medium", "locality"], "{v}"),
        other => panic!("unexpected event {other}"),
    }
    (tag, hashes.collect(), fields["medium"].as_str().unwrap().to_string())
}

#[test]
fn subscribers_decode_stored_moved_removed_and_cleared_blocks_with_their_medium() {
    let context = zmq::Context::new();
    // As llm-d's indexer does: the subscriber binds, the engine side connects.
    let sub = context.socket(zmq::SUB).unwrap();
    sub.bind("tcp://127.0.0.1:*").unwrap();
    sub.set_subscribe(b"kv@").unwrap();
    sub.set_rcvtimeo(10_000).unwrap();
    let endpoint = sub.get_last_endpoint().unwrap().unwrap();

    let dir = std::env::temp_dir().join(format!("kvferry-kv-events-{}", std::process::id()));
    let disk = DiskConfig::new(&dir, 8 * BLOCK as u64).with_admit_after(0);
    let store =
        TierStore::open(TierConfig::new(BLOCK, 2 * BLOCK as u64).with_host_alloc(UNPINNED).with_disk(disk)).unwrap();
    let mut config = KvEventsConfig::new(endpoint, 16).with_pod_and_model("pod-0", "org/model").unwrap();
    config.data_parallel_rank = Some(0);
    config.replay_endpoint = Some("tcp://127.0.0.1:*".into());
    let publisher = KvEventPublisher::start(&store, config).unwrap();
    // A PUB drops what it sends until the connection and the subscription are up: put a probe
    // block until its event arrives, then let the rest of the probes' events drain.
    let mut last_seq = None;
    sub.set_rcvtimeo(200).unwrap();
    for probe in 100..200 {
        put(&store, &[probe]);
        if let Ok(frames) = sub.recv_multipart(0) {
            last_seq = Some(u64::from_be_bytes(frames[1].as_slice().try_into().unwrap()));
            break;
        }
    }
    store.clear().unwrap();
    while let Ok(frames) = sub.recv_multipart(0) {
        last_seq = Some(u64::from_be_bytes(frames[1].as_slice().try_into().unwrap()));
    }
    let first_seq = last_seq.expect("the subscriber connects within 20 s") + 1;
    sub.set_rcvtimeo(10_000).unwrap();

    put(&store, &[0, 1]); // Stored(CPU) [0, 1]
    put(&store, &[2]); // DRAM holds two: block 0 moves to disk, then Stored(CPU) [2]
    store.clear().unwrap(); // Removed(CPU) [1, 2], Removed(DISK) [0], AllBlocksCleared

    let mut batches = Vec::new();
    let mut events = Vec::new();
    while events.len() < 7 {
        let frames = sub.recv_multipart(0).expect("the events arrive within 10 s");
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], b"kv@pod-0@org/model");
        let seq = u64::from_be_bytes(frames[1].as_slice().try_into().unwrap());
        assert_eq!(seq, first_seq + batches.len() as u64, "sequence numbers count batches");
        let batch = rmpv::decode::read_value(&mut frames[2].as_slice()).unwrap();
        let fields = batch.as_array().unwrap();
        assert_eq!(fields.len(), 3, "[ts, events, data_parallel_rank]: {batch}");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((now - fields[0].as_f64().unwrap()).abs() < 60.0, "ts is seconds since the epoch: {batch}");
        assert_eq!(fields[2].as_i64(), Some(0));
        let decoded: Vec<_> = fields[1].as_array().unwrap().iter().map(event).collect();
        events.extend(decoded.iter().cloned());
        batches.push((frames[1].clone(), frames[2].clone(), decoded));
    }
    let ev = |tag: &str, ids: &[u8], medium: &str| {
        (tag.to_string(), ids.iter().map(|&i| int_hash(i)).collect(), medium.to_string())
    };
    let mut expected = vec![
        ev("BlockStored", &[0, 1], "CPU"),
        ev("BlockRemoved", &[0], "CPU"),
        ev("BlockStored", &[0], "STORAGE"),
        ev("BlockStored", &[2], "CPU"),
    ];
    assert_eq!(events[..4], expected[..], "{events:?}");
    // The move is one removal and one store, in the same batch.
    assert!(batches.iter().any(|(.., b)| b.windows(2).any(|w| w[0] == expected[1] && w[1] == expected[2])));
    // The order of a clear's removals, and of the blocks within one, means nothing; the clear
    // comes last.
    assert_eq!(events[6], ("AllBlocksCleared".to_string(), vec![], String::new()));
    let mut cleared: Vec<_> = events[4..6].to_vec();
    cleared.iter_mut().for_each(|(_, hashes, _)| hashes.sort());
    cleared.sort();
    expected = vec![ev("BlockRemoved", &[0], "STORAGE"), ev("BlockRemoved", &[1, 2], "CPU")];
    expected.sort();
    assert_eq!(cleared, expected);

    // A subscriber that missed batches asks the replay socket for them, from the second on.
    let replay = context.socket(zmq::DEALER).unwrap();
    replay.set_rcvtimeo(10_000).unwrap();
    replay.connect(publisher.replay_endpoint().unwrap()).unwrap();
    replay.send_multipart([&b""[..], &(first_seq + 1).to_be_bytes()], 0).unwrap();
    // As vLLM 0.32's ROUTER answers: the topic, the number and the payload as published, then an
    // end marker with an empty topic.
    let topic = b"kv@pod-0@org/model".to_vec();
    for (seq, payload, _) in &batches[1..] {
        assert_eq!(replay.recv_multipart(0).unwrap(), vec![vec![], topic.clone(), seq.clone(), payload.clone()]);
    }
    assert_eq!(replay.recv_multipart(0).unwrap(), vec![vec![], vec![], (-1i64).to_be_bytes().to_vec(), vec![]]);
    drop(publisher);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
