//! A tier store's events published over ZMQ in the shape vLLM publishes its KV cache events
//! (`vllm/distributed/kv_events.py`), so that a prefix-cache-aware router (llm-d's KV cache
//! indexer, Dynamo's) that already follows vLLM learns where kvferry keeps blocks: in DRAM
//! (`"CPU"`) or on disk (`"STORAGE"`), next to vLLM's own `"GPU"` events.
//!
//! ```text
//! PUB multipart   [topic, seq: u64 big-endian, msgpack(batch)]
//! batch           [ts: f64, [event, ...], data_parallel_rank: int | nil]
//! BlockStored     {"type": "BlockStored", "block_hashes": [hash, ...], "parent_block_hash": nil,
//!                  "token_ids": [], "block_size": n, "lora_id": nil, "medium": m, "lora_name": nil}
//! BlockRemoved    {"type": "BlockRemoved", "block_hashes": [hash, ...], "medium": m}
//! ```
//! As msgspec encodes vLLM's structs (an array-like batch of tagged events); the tests pin the
//! bytes vLLM's own classes produce. A hash is the engine's block hash bytes the store was given
//! (`BlockKey::from_engine_hash`), as vLLM sends `ExternalBlockHash` bytes; the medium is vLLM's
//! spelling: `"CPU"`, and `"STORAGE"` for the disk tier. A move (`TierEvent::Moved`) becomes
//! `BlockRemoved(from)` and `BlockStored(to)` in one batch. The store knows neither a block's parent
//! nor its tokens, so those are left empty.
//!
//! Like vLLM's publisher, an optional ROUTER socket answers replay requests
//! (`[identity, "", start seq: u64 big-endian]`) with every buffered batch from that sequence
//! number, each as `[identity, "", seq, payload]`, then `[identity, "", -1 as i64, ""]`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::tier::{BlockKey, Medium, TierEvent, TierStore};

/// The `zmq` crate this module is built with, for subscribers in the same program.
pub use zmq;

/// Where and how a store's events are published.
#[derive(Debug, Clone)]
pub struct KvEventsConfig {
    /// ZMQ endpoint. As in vLLM, an endpoint with a wildcard (`tcp://*:5557`), `ipc://` or
    /// `inproc://` is bound; any other (`tcp://indexer:5557`) is connected to, the way engines
    /// connect to a router's bound subscriber.
    pub endpoint: String,
    /// A ROUTER endpoint (bound) answering replay requests; `None` for none.
    pub replay_endpoint: Option<String>,
    pub topic: String,
    /// Tokens per block, the `block_size` of `BlockStored` (the engine's, not bytes).
    pub block_tokens: u32,
    /// Sent with every batch when set, as vLLM's data-parallel rank.
    pub data_parallel_rank: Option<i64>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// High-water mark of the PUB socket: messages beyond it are dropped for slow subscribers
    /// (never blocking the store).
    pub hwm: i32,
}

impl KvEventsConfig {
    pub fn new(endpoint: impl Into<String>, block_tokens: u32) -> Self {
        KvEventsConfig {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: String::new(),
            block_tokens,
            data_parallel_rank: None,
            buffer_steps: 10_000,
            hwm: 100_000,
        }
    }
}

/// Publishes a [`TierStore`]'s events until dropped.
pub struct KvEventPublisher {
    endpoint: String,
    replay_endpoint: Option<String>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long the publishing thread waits for an event before checking for replay requests and
/// whether to stop.
const POLL: Duration = Duration::from_millis(20);

fn zmq_error(context: String) -> impl FnOnce(zmq::Error) -> Error {
    move |e| Error::Io { context, cause: e.to_string() }
}

impl KvEventPublisher {
    /// Bind or connect the sockets (errors are returned here) and start publishing `store`'s
    /// events from now on.
    pub fn start(store: &TierStore, config: KvEventsConfig) -> Result<KvEventPublisher> {
        let context = zmq::Context::new();
        let publisher = context.socket(zmq::PUB).map_err(zmq_error("creating a ZMQ PUB socket".into()))?;
        publisher.set_sndhwm(config.hwm).map_err(zmq_error("setting the PUB high-water mark".into()))?;
        publisher.set_linger(1000).map_err(zmq_error("setting the PUB linger".into()))?;
        let binds = ["*", "::"].iter().any(|w| config.endpoint.contains(w))
            || config.endpoint.starts_with("ipc://")
            || config.endpoint.starts_with("inproc://");
        let attach = if binds { publisher.bind(&config.endpoint) } else { publisher.connect(&config.endpoint) };
        attach.map_err(zmq_error(format!("opening the KV event endpoint {}", config.endpoint)))?;
        let endpoint = last_endpoint(&publisher).unwrap_or_else(|| config.endpoint.clone());
        let replay = match &config.replay_endpoint {
            Some(at) => {
                let router = context.socket(zmq::ROUTER).map_err(zmq_error("creating a ZMQ ROUTER socket".into()))?;
                router.bind(at).map_err(zmq_error(format!("binding the KV event replay endpoint {at}")))?;
                Some(router)
            }
            None => None,
        };
        let replay_endpoint = replay.as_ref().and_then(last_endpoint);
        let stop = Arc::new(AtomicBool::new(false));
        let mut run = Publishing {
            events: store.subscribe(),
            publisher,
            replay,
            topic: config.topic.into_bytes(),
            block_tokens: config.block_tokens,
            data_parallel_rank: config.data_parallel_rank,
            buffer: VecDeque::new(),
            buffer_steps: config.buffer_steps,
            next_seq: 0,
            stop: stop.clone(),
        };
        let thread = thread::Builder::new()
            .name("kvferry-kv-events".into())
            .spawn(move || run.run())
            .map_err(|e| Error::io("spawning the KV event publisher", e))?;
        Ok(KvEventPublisher { endpoint, replay_endpoint, stop, thread: Some(thread) })
    }

    /// The endpoint as ZMQ resolved it (the port a `tcp://*:0` bind picked).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }
}

impl Drop for KvEventPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn last_endpoint(socket: &zmq::Socket) -> Option<String> {
    socket.get_last_endpoint().ok()?.ok()
}

struct Publishing {
    events: Receiver<TierEvent>,
    publisher: zmq::Socket,
    replay: Option<zmq::Socket>,
    topic: Vec<u8>,
    block_tokens: u32,
    data_parallel_rank: Option<i64>,
    buffer: VecDeque<(u64, Vec<u8>)>,
    buffer_steps: usize,
    next_seq: u64,
    stop: Arc<AtomicBool>,
}

impl Publishing {
    fn run(&mut self) {
        while !self.stop.load(Ordering::Acquire) {
            // libzmq attaches new subscribers and reads their subscriptions only inside calls on
            // the socket: asking for its events does that, so a subscriber that connected while
            // the store was quiet gets the next batch rather than missing it.
            let _ = self.publisher.get_events();
            self.serve_replay();
            // Everything that arrived together goes out as one batch.
            let first = match self.events.recv_timeout(POLL) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let batch: Vec<TierEvent> = std::iter::once(first).chain(self.events.try_iter()).collect();
            let payload = encode_batch(&batch, self.block_tokens, self.data_parallel_rank, now());
            let seq = self.next_seq;
            self.next_seq += 1;
            let frames = [self.topic.as_slice(), &seq.to_be_bytes(), &payload];
            if let Err(e) = self.publisher.send_multipart(frames, 0) {
                tracing::warn!(error = %e, seq, "KV events: a batch could not be sent");
            }
            if self.buffer.len() == self.buffer_steps {
                self.buffer.pop_front();
            }
            if self.buffer_steps > 0 {
                self.buffer.push_back((seq, payload));
            }
        }
    }

    fn serve_replay(&self) {
        let Some(router) = &self.replay else { return };
        while let Ok(request) = router.recv_multipart(zmq::DONTWAIT) {
            let [identity, _, start] = request.as_slice() else {
                tracing::debug!(frames = request.len(), "KV events: ignoring a malformed replay request");
                continue;
            };
            let Ok(start) = <[u8; 8]>::try_from(start.as_slice()).map(u64::from_be_bytes) else { continue };
            let replies = self.buffer.iter().filter(|(seq, _)| *seq >= start).map(|(seq, p)| (seq.to_be_bytes(), p));
            for (seq, payload) in replies {
                let _ = router.send_multipart([identity.as_slice(), b"", &seq, payload], 0);
            }
            let _ = router.send_multipart([identity.as_slice(), b"", &(-1i64).to_be_bytes(), b""], 0);
        }
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One batch as msgpack; writing into a `Vec` cannot fail.
fn encode_batch(events: &[TierEvent], block_tokens: u32, rank: Option<i64>, ts: f64) -> Vec<u8> {
    use rmp::encode::{write_array_len, write_f64, write_nil, write_sint};
    let mut out = Vec::new();
    let count: usize = events.iter().map(|e| if matches!(e, TierEvent::Moved { .. }) { 2 } else { 1 }).sum();
    write_array_len(&mut out, 3).unwrap();
    write_f64(&mut out, ts).unwrap();
    write_array_len(&mut out, count as u32).unwrap();
    for event in events {
        match event {
            TierEvent::Stored { keys, medium } => stored(&mut out, keys, *medium, block_tokens),
            TierEvent::Removed { keys, medium } => removed(&mut out, keys, *medium),
            TierEvent::Moved { keys, from, to } => {
                removed(&mut out, keys, *from);
                stored(&mut out, keys, *to, block_tokens);
            }
        }
    }
    match rank {
        Some(rank) => write_sint(&mut out, rank).map(drop).unwrap(),
        None => write_nil(&mut out).unwrap(),
    }
    out
}

/// vLLM's name for a medium (`MEDIUM_*` in `vllm/distributed/kv_events.py`).
pub fn vllm_medium(medium: Medium) -> &'static str {
    match medium {
        Medium::Disk => "STORAGE",
        other => other.as_str(),
    }
}

fn field(out: &mut Vec<u8>, name: &str) {
    rmp::encode::write_str(out, name).unwrap();
}

/// The tag and the block hashes every event starts with.
fn head(out: &mut Vec<u8>, tag: &str, fields: u32, keys: &[BlockKey]) {
    rmp::encode::write_map_len(out, fields).unwrap();
    field(out, "type");
    field(out, tag);
    field(out, "block_hashes");
    rmp::encode::write_array_len(out, keys.len() as u32).unwrap();
    for key in keys {
        rmp::encode::write_bin(out, key.as_bytes()).unwrap();
    }
}

fn stored(out: &mut Vec<u8>, keys: &[BlockKey], medium: Medium, block_tokens: u32) {
    use rmp::encode::{write_array_len, write_nil, write_uint};
    head(out, "BlockStored", 8, keys);
    field(out, "parent_block_hash");
    write_nil(out).unwrap();
    field(out, "token_ids");
    write_array_len(out, 0).unwrap();
    field(out, "block_size");
    write_uint(out, block_tokens.into()).unwrap();
    field(out, "lora_id");
    write_nil(out).unwrap();
    field(out, "medium");
    field(out, vllm_medium(medium));
    field(out, "lora_name");
    write_nil(out).unwrap();
}

fn removed(out: &mut Vec<u8>, keys: &[BlockKey], medium: Medium) {
    head(out, "BlockRemoved", 3, keys);
    field(out, "medium");
    field(out, vllm_medium(medium));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `msgspec.msgpack.encode(KVEventBatch(ts=1.5, events=[BlockRemoved([h], medium="CPU"),
    /// BlockStored([h], None, [], 16, None, "STORAGE", None)]))` with vLLM's own classes, where
    /// `h = bytes(range(32))`.
    const VLLM_BYTES: &str = "93cb3ff80000000000009283a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa66d656469756da343505588a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f69647390aa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da753544f52414745a96c6f72615f6e616d65c0c0";

    #[test]
    fn a_move_encodes_as_the_bytes_vllm_sends() {
        let key = BlockKey::from_engine_hash(&(0..32).collect::<Vec<u8>>()).unwrap();
        let moved = TierEvent::Moved { keys: vec![key], from: Medium::Cpu, to: Medium::Disk };
        let hex: String = encode_batch(&[moved], 16, None, 1.5).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, VLLM_BYTES);
    }
}
