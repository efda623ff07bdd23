//! A tier store's events published over ZMQ in the shape vLLM publishes its KV cache events
//! (`vllm/distributed/kv_events.py`), so that a prefix-cache-aware router (llm-d's KV cache
//! indexer, Dynamo's) that already follows vLLM learns where kvferry keeps blocks: in DRAM
//! (`"CPU"`) or on disk (`"STORAGE"`), next to vLLM's own `"GPU"` events.
//!
//! ```text
//! PUB multipart    [topic, seq: u64 big-endian, msgpack(batch)]
//! batch            [ts: f64, [event, ...], data_parallel_rank: int | nil]
//! BlockStored      {"type": "BlockStored", "block_hashes": [hash, ...], "parent_block_hash": nil,
//!                   "token_ids": [], "block_size": n, "lora_id": nil, "medium": m, "lora_name": nil,
//!                   "locality": "LOCAL"}
//! BlockRemoved     {"type": "BlockRemoved", "block_hashes": [hash, ...], "medium": m, "locality": "LOCAL"}
//! AllBlocksCleared {"type": "AllBlocksCleared"}
//! ```
//! As msgspec encodes vLLM 0.32's structs: an array-like batch of events tagged by `type`, each a
//! map whose fields come in the order the struct declares them, those left at their defaults
//! omitted (`omit_defaults`); the unit tests pin the bytes vLLM's own classes produce. The topic is
//! `kv@<pod>@<model>` ([`kv_topic`]), which llm-d's indexer splits into the pod and the model.
//! A hash is, by default, vLLM's integer form (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`, on by default:
//! the key's bytes big-endian, cut to the low 64 bits), which for a key from an engine hash
//! (`BlockKey::from_engine_hash`) is the engine's own event hash; [`HashForm::Bytes`] sends the key
//! bytes instead. The medium is [`Medium::kv_event_name`]. The store knows neither a block's parent
//! nor its tokens, so a `BlockStored` is a token-less tier update, which routers apply to the
//! blocks they already know from the engine's GPU events; a move (`TierEvent::Moved`) is
//! `BlockRemoved(from)` and `BlockStored(to)` in one batch, and `TierEvent::Cleared` is
//! `AllBlocksCleared`.
//!
//! Like vLLM's publisher, an optional ROUTER socket answers replay requests
//! (`[identity, "", start seq: u64 big-endian]`) with every buffered batch from that sequence
//! number, each as `[identity, "", topic, seq, payload]`, then `[identity, "", "", -1 as i64, ""]`.

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

/// How a block hash is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashForm {
    /// An unsigned 64-bit integer: the key's bytes read big-endian, cut to the low 64 bits, as
    /// vLLM's `maybe_convert_block_hash` does by default and llm-d's adapter reads any hash.
    #[default]
    Int,
    /// The key's bytes, as vLLM sends them with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`.
    Bytes,
}

impl std::str::FromStr for HashForm {
    type Err = Error;

    fn from_str(s: &str) -> Result<HashForm> {
        match s {
            "int" => Ok(HashForm::Int),
            "bytes" => Ok(HashForm::Bytes),
            other => Err(Error::InvalidArgument(format!("the hash form is \"int\" or \"bytes\", not {other:?}"))),
        }
    }
}

/// vLLM's `locality` of an event: where the tier is relative to the publishing instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locality {
    /// DRAM of this host, a disk directory on a local device.
    Local,
    /// A disk directory on network storage; always the remote tier's blocks.
    Remote,
}

impl Locality {
    pub fn as_str(self) -> &'static str {
        match self {
            Locality::Local => "LOCAL",
            Locality::Remote => "REMOTE",
        }
    }
}

impl std::str::FromStr for Locality {
    type Err = Error;

    fn from_str(s: &str) -> Result<Locality> {
        match s {
            "LOCAL" => Ok(Locality::Local),
            "REMOTE" => Ok(Locality::Remote),
            other => Err(Error::InvalidArgument(format!("the locality is \"LOCAL\" or \"REMOTE\", not {other:?}"))),
        }
    }
}

/// The topic llm-d's KV cache indexer subscribes to (`kv@`) and reads the pod and the model from
/// (`kv@<pod>@<model>`, split at `@`); neither may be empty or hold an `@`.
pub fn kv_topic(pod: &str, model: &str) -> Result<String> {
    for (what, value) in [("pod", pod), ("model", model)] {
        if value.is_empty() || value.contains('@') {
            return Err(Error::InvalidArgument(format!(
                "the KV event topic's {what} must be non-empty and without '@', got {value:?}"
            )));
        }
    }
    Ok(format!("kv@{pod}@{model}"))
}

/// Where and how a store's events are published: the one list of settings the front ends fill in.
#[derive(Debug, Clone)]
pub struct KvEventsConfig {
    /// ZMQ endpoint. As in vLLM, an endpoint with a wildcard (`tcp://*:5557`), `ipc://` or
    /// `inproc://` is bound; any other (`tcp://indexer:5557`) is connected to, the way engines
    /// connect to a router's bound subscriber.
    pub endpoint: String,
    /// A ROUTER endpoint (bound) answering replay requests; `None` for none.
    pub replay_endpoint: Option<String>,
    /// The first frame of every message; [`KvEventsConfig::with_pod_and_model`] sets the form
    /// llm-d subscribes to. Empty by default, as vLLM's.
    pub topic: String,
    /// Tokens per block, the `block_size` of `BlockStored` (the engine's, not bytes).
    pub block_tokens: u32,
    /// Sent with every batch when set, as vLLM's data-parallel rank.
    pub data_parallel_rank: Option<i64>,
    pub hash_form: HashForm,
    /// Sent with every `BlockStored` and `BlockRemoved` when set; `Local` by default, as vLLM's
    /// own offloading connector sends for its CPU and disk tiers.
    pub locality: Option<Locality>,
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
            hash_form: HashForm::Int,
            locality: Some(Locality::Local),
            buffer_steps: 10_000,
            hwm: 100_000,
        }
    }

    /// Publish under `kv@<pod>@<model>` ([`kv_topic`]).
    pub fn with_pod_and_model(mut self, pod: &str, model: &str) -> Result<Self> {
        self.topic = kv_topic(pod, model)?;
        Ok(self)
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
            encoding: Encoding {
                block_tokens: config.block_tokens,
                data_parallel_rank: config.data_parallel_rank,
                hash_form: config.hash_form,
                locality: config.locality,
            },
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
    encoding: Encoding,
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
            let payload = self.encoding.batch(&batch, now());
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
            // As vLLM's `_service_replay`: after the identity and the delimiter, each reply is what
            // the PUB socket sent, and the end marker has an empty topic.
            let replies = self.buffer.iter().filter(|(seq, _)| *seq >= start).map(|(seq, p)| (seq.to_be_bytes(), p));
            for (seq, payload) in replies {
                let _ = router.send_multipart([identity.as_slice(), b"", &self.topic, &seq, payload], 0);
            }
            let _ = router.send_multipart([identity.as_slice(), b"", b"", &(-1i64).to_be_bytes(), b""], 0);
        }
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// What every batch is encoded with, from the config.
struct Encoding {
    block_tokens: u32,
    data_parallel_rank: Option<i64>,
    hash_form: HashForm,
    locality: Option<Locality>,
}

impl Encoding {
    /// One batch as msgpack; writing into a `Vec` cannot fail.
    fn batch(&self, events: &[TierEvent], ts: f64) -> Vec<u8> {
        use rmp::encode::{write_array_len, write_f64, write_nil, write_sint};
        let mut out = Vec::new();
        let count: usize = events.iter().map(|e| if matches!(e, TierEvent::Moved { .. }) { 2 } else { 1 }).sum();
        write_array_len(&mut out, 3).unwrap();
        write_f64(&mut out, ts).unwrap();
        write_array_len(&mut out, count as u32).unwrap();
        for event in events {
            match event {
                TierEvent::Stored { keys, medium } => self.stored(&mut out, keys, *medium),
                TierEvent::Removed { keys, medium } => self.removed(&mut out, keys, *medium),
                TierEvent::Moved { keys, from, to } => {
                    self.removed(&mut out, keys, *from);
                    self.stored(&mut out, keys, *to);
                }
                TierEvent::Cleared => {
                    rmp::encode::write_map_len(&mut out, 1).unwrap();
                    field(&mut out, "type");
                    field(&mut out, "AllBlocksCleared");
                }
            }
        }
        match self.data_parallel_rank {
            Some(rank) => write_sint(&mut out, rank).map(drop).unwrap(),
            None => write_nil(&mut out).unwrap(),
        }
        out
    }

    /// The tag and the block hashes every block event starts with; `fields` does not count
    /// `locality`.
    fn head(&self, out: &mut Vec<u8>, tag: &str, fields: u32, keys: &[BlockKey]) {
        rmp::encode::write_map_len(out, fields + u32::from(self.locality.is_some())).unwrap();
        field(out, "type");
        field(out, tag);
        field(out, "block_hashes");
        rmp::encode::write_array_len(out, keys.len() as u32).unwrap();
        for key in keys {
            match self.hash_form {
                HashForm::Int => rmp::encode::write_uint(out, int_hash(key)).map(drop).unwrap(),
                HashForm::Bytes => rmp::encode::write_bin(out, key.as_bytes()).unwrap(),
            }
        }
    }

    /// vLLM declares `locality` after the fields kvferry leaves at their defaults (`extra_keys`,
    /// `group_idx`, the cache spec), which msgspec omits, so it comes right after `medium` or
    /// `lora_name`. Blocks of the level every engine shares are `REMOTE` whatever the config says
    /// of the store's own tiers.
    fn locality(&self, out: &mut Vec<u8>, medium: Medium) {
        if let Some(locality) = self.locality {
            field(out, "locality");
            field(out, if medium == Medium::Remote { Locality::Remote.as_str() } else { locality.as_str() });
        }
    }

    fn stored(&self, out: &mut Vec<u8>, keys: &[BlockKey], medium: Medium) {
        use rmp::encode::{write_array_len, write_nil, write_uint};
        self.head(out, "BlockStored", 8, keys);
        field(out, "parent_block_hash");
        write_nil(out).unwrap();
        field(out, "token_ids");
        write_array_len(out, 0).unwrap();
        field(out, "block_size");
        write_uint(out, self.block_tokens.into()).unwrap();
        field(out, "lora_id");
        write_nil(out).unwrap();
        field(out, "medium");
        field(out, medium.kv_event_name());
        field(out, "lora_name");
        write_nil(out).unwrap();
        self.locality(out, medium);
    }

    fn removed(&self, out: &mut Vec<u8>, keys: &[BlockKey], medium: Medium) {
        self.head(out, "BlockRemoved", 3, keys);
        field(out, "medium");
        field(out, medium.kv_event_name());
        self.locality(out, medium);
    }
}

/// vLLM's `maybe_convert_block_hash`: `int.from_bytes(hash, "big") & (2**64 - 1)`, the last eight
/// bytes (fewer zero-extended), which is also how llm-d's adapter reads a hash sent as bytes.
pub fn int_hash(key: &BlockKey) -> u64 {
    let bytes = key.as_bytes();
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b))
}

fn field(out: &mut Vec<u8>, name: &str) {
    rmp::encode::write_str(out, name).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn key(bytes: &[u8]) -> BlockKey {
        BlockKey::from_engine_hash(bytes).unwrap()
    }

    fn encoding(hash_form: HashForm, locality: Option<Locality>, data_parallel_rank: Option<i64>) -> Encoding {
        Encoding { block_tokens: 16, data_parallel_rank, hash_form, locality }
    }

    /// `msgspec.msgpack.encode(KVEventBatch(ts=1.5, events=[BlockRemoved(ints, medium="CPU",
    /// locality="LOCAL"), BlockStored(ints, None, [], 16, None, "STORAGE", None, locality="LOCAL"),
    /// AllBlocksCleared()], data_parallel_rank=3))` with vLLM 0.32's own classes, where `ints` are
    /// `maybe_convert_block_hash` of `bytes(range(32))`, `b"\xff" * 32` and `b"\x01\x02\x03"`.
    const VLLM_INT_BYTES: &str = "93cb3ff80000000000009384a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657393cf18191a1b1c1d1e1fcfffffffffffffffffce00010203a66d656469756da3435055a86c6f63616c697479a54c4f43414c89a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657393cf18191a1b1c1d1e1fcfffffffffffffffffce00010203b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f69647390aa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da753544f52414745a96c6f72615f6e616d65c0a86c6f63616c697479a54c4f43414c81a474797065b0416c6c426c6f636b73436c656172656403";

    /// The same move with `h = bytes(range(32))` sent as bytes and no locality:
    /// `KVEventBatch(ts=1.5, events=[BlockRemoved([h], medium="CPU"), BlockStored([h], None, [],
    /// 16, None, "STORAGE", None)])`.
    const VLLM_BYTES: &str = "93cb3ff80000000000009283a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa66d656469756da343505588a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f69647390aa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da753544f52414745a96c6f72615f6e616d65c0c0";

    #[test]
    fn a_move_and_a_clear_encode_as_the_bytes_vllm_sends() {
        let keys = vec![key(&(0..32).collect::<Vec<u8>>()), key(&[0xff; 32]), key(&[1, 2, 3])];
        let events = [TierEvent::Moved { keys, from: Medium::Cpu, to: Medium::Disk }, TierEvent::Cleared];
        let encoded = encoding(HashForm::Int, Some(Locality::Local), Some(3)).batch(&events, 1.5);
        assert_eq!(hex(&encoded), VLLM_INT_BYTES);
    }

    #[test]
    fn hashes_as_bytes_without_locality_encode_as_the_bytes_vllm_sends() {
        let moved =
            TierEvent::Moved { keys: vec![key(&(0..32).collect::<Vec<u8>>())], from: Medium::Cpu, to: Medium::Disk };
        assert_eq!(hex(&encoding(HashForm::Bytes, None, None).batch(&[moved], 1.5)), VLLM_BYTES);
    }

    #[test]
    fn int_hashes_are_the_low_64_bits_big_endian() {
        assert_eq!(int_hash(&key(&(0..32).collect::<Vec<u8>>())), 0x18191a1b1c1d1e1f);
        assert_eq!(int_hash(&key(&42u64.to_be_bytes())), 42, "an engine's int hash comes back as it was");
        assert_eq!(int_hash(&key(&[1, 2, 3])), 0x010203);
    }

    #[test]
    fn media_are_spelled_as_vllm_spells_them() {
        let names: Vec<&str> = Medium::ALL.iter().map(|m| m.kv_event_name()).collect();
        assert_eq!(names, ["GPU", "CPU", "STORAGE", "STORAGE"]);
    }

    #[test]
    fn remote_blocks_are_storage_with_the_remote_locality_whatever_the_config_says() {
        let keys = vec![key(&[9; 16])];
        let encoding = encoding(HashForm::Int, Some(Locality::Local), None);
        let batch = encoding.batch(&[TierEvent::Stored { keys: keys.clone(), medium: Medium::Remote }], 1.0);
        let value = rmpv::decode::read_value(&mut &batch[..]).unwrap();
        let event = &value[1][0];
        let field =
            |name: &str| event.as_map().unwrap().iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v.clone());
        assert_eq!(field("medium").unwrap().as_str(), Some("STORAGE"));
        assert_eq!(field("locality").unwrap().as_str(), Some("REMOTE"));
        let local = encoding.batch(&[TierEvent::Stored { keys, medium: Medium::Disk }], 1.0);
        let local = rmpv::decode::read_value(&mut &local[..]).unwrap();
        let locality = local[1][0].as_map().unwrap().iter().find(|(k, _)| k.as_str() == Some("locality")).cloned();
        assert_eq!(locality.unwrap().1.as_str(), Some("LOCAL"));
    }

    #[test]
    fn the_topic_names_the_pod_and_the_model_for_llm_d() {
        assert_eq!(kv_topic("vllm-0", "meta-llama/Llama-3.1-8B").unwrap(), "kv@vllm-0@meta-llama/Llama-3.1-8B");
        let config = KvEventsConfig::new("tcp://*:5557", 16).with_pod_and_model("p", "m").unwrap();
        assert_eq!(config.topic, "kv@p@m");
        for (pod, model) in [("a@b", "m"), ("p", ""), ("", "m")] {
            assert!(matches!(kv_topic(pod, model), Err(Error::InvalidArgument(_))), "{pod:?} {model:?}");
        }
        assert!(matches!("BYTES".parse::<HashForm>(), Err(Error::InvalidArgument(_))));
        assert!(matches!("local".parse::<Locality>(), Err(Error::InvalidArgument(_))));
        assert_eq!("bytes".parse::<HashForm>().unwrap(), HashForm::Bytes);
        assert_eq!("REMOTE".parse::<Locality>().unwrap(), Locality::Remote);
    }
}
