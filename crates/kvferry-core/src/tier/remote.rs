//! The remote level: KV blocks in storage that every engine and host pointing at it shares,
//! S3-compatible object storage or a shared directory, both through the `object_store` client.
//!
//! An object holds one block and names it by the block's key under a fingerprint of everything that
//! makes bytes incompatible (the namespace), so that caches of different models, dtypes, layouts or
//! head slices never mix:
//!
//! ```text
//! <prefix>/<fingerprint: 32 hex>/<key: hex>
//!   "KVFR" | version u16 | header bytes u16 | fingerprint [16] | key length u8 | key | data bytes u64
//!   | data | xxh3-64 over everything before it
//! ```
//!
//! Uploads run behind the engine (write-behind) and lookups ahead of it (a lookup that is not
//! answered yet says so instead of waiting); both are bounded in bytes and requests in flight, and
//! every request has a deadline. A circuit breaker stops sending requests to a store that keeps
//! failing and lets one through again after a while to find out whether it is back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use xxhash_rust::xxh3::Xxh3;

use crate::deadline::Deadline;
use crate::sync::Locked;
use crate::tier::{BlockKey, MAX_KEY_BYTES, TierError};

const MAGIC: &[u8; 4] = b"KVFR";
const VERSION: u16 = 1;
const FINGERPRINT_BYTES: usize = 16;
const CHECKSUM_BYTES: usize = 8;
/// Bytes before the key in an object's header.
const FIXED_HEADER_BYTES: usize = 4 + 2 + 2 + FINGERPRINT_BYTES + 1;
/// Entries of the table of keys known present or absent; past it the table starts over (a lookup
/// then asks the store again), so that it never grows without bound.
const MAX_KNOWN_KEYS: usize = 1 << 20;

/// Where the shared blocks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteLocation {
    /// An object store URL: `s3://bucket/prefix` (any S3-compatible store; credentials, region and
    /// endpoint from the usual `AWS_*` environment variables or [`RemoteConfig::options`]), or
    /// `file:///path`.
    Url(String),
    /// A directory every host mounts (NFS, Lustre, CephFS, 3FS, or a local path): one file per
    /// block, written under a temporary name and renamed into place.
    Path(PathBuf),
}

impl std::fmt::Display for RemoteLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteLocation::Url(url) => f.write_str(url),
            RemoteLocation::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

/// How a store uses its remote level.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub location: RemoteLocation,
    /// Everything that makes two engines' bytes for one key differ: model identity, dtype, tokens
    /// per block, layout, and the head slice or tensor-parallel rank the blocks hold. Hashed (with
    /// the block size) into the objects' fingerprint; engines share blocks exactly when their
    /// namespaces are equal.
    pub namespace: String,
    /// Client settings by `object_store` name (`aws_endpoint`, `aws_region`, `aws_allow_http`...),
    /// which take precedence over the environment.
    pub options: Vec<(String, String)>,
    /// The deadline of each request, retries included.
    pub timeout: Duration,
    /// Requests in flight at once, for reads and for writes each.
    pub concurrency: usize,
    /// Bytes of uploads queued or in flight; a block offered beyond it is dropped (and counted)
    /// rather than making the engine wait.
    pub max_upload_bytes: u64,
    /// Consecutive failed requests after which the breaker opens: no request is sent for
    /// `retry_after`, then one probes the store.
    pub failures_to_open: u32,
    pub retry_after: Duration,
    /// How long a key found absent is remembered before a lookup asks again.
    pub absent_for: Duration,
    /// Keys one lookup asks the store about at most, in prefix order.
    pub max_lookup_keys: usize,
}

impl RemoteConfig {
    pub fn new(location: RemoteLocation, namespace: impl Into<String>) -> Self {
        RemoteConfig {
            location,
            namespace: namespace.into(),
            options: Vec::new(),
            timeout: Duration::from_secs(5),
            concurrency: 16,
            max_upload_bytes: 256 << 20,
            failures_to_open: 3,
            retry_after: Duration::from_secs(5),
            absent_for: Duration::from_secs(2),
            max_lookup_keys: 1024,
        }
    }

    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    pub fn with_max_upload_bytes(mut self, bytes: u64) -> Self {
        self.max_upload_bytes = bytes;
        self
    }

    pub fn with_breaker(mut self, failures_to_open: u32, retry_after: Duration) -> Self {
        self.failures_to_open = failures_to_open;
        self.retry_after = retry_after;
        self
    }
}

/// Counters of a remote level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Blocks read from the remote (and promoted into DRAM by a store).
    pub hits: u64,
    /// Keys the remote did not hold when asked.
    pub misses: u64,
    pub uploads: u64,
    pub upload_bytes: u64,
    /// Offered blocks not uploaded because the remote already holds them.
    pub already_stored: u64,
    /// Offered blocks dropped: the upload budget was spent or the breaker was open.
    pub dropped: u64,
    /// Requests that failed (unreachable, timed out, refused by the server).
    pub errors: u64,
    /// Objects that failed their checksum or framing, and were never served.
    pub corrupt: u64,
    /// Objects under our name whose header names another fingerprint or key.
    pub mismatched: u64,
    /// Times the breaker opened.
    pub breaker_trips: u64,
    pub breaker_open: bool,
    /// Bytes of uploads queued or in flight now.
    pub upload_bytes_pending: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// What a lookup in the remote knows so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteLookup {
    /// The first `n` keys are in the remote (those after them are not, or were not asked about).
    Found(usize),
    /// The remote is being asked; look again later.
    Pending,
}

#[derive(Debug, Clone, Copy)]
enum Known {
    Present,
    Absent(Instant),
    /// A lookup or upload is asking or writing it now.
    InFlight,
}

/// The circuit breaker in front of the store: after `failures_to_open` failed requests in a row
/// no request goes out for `retry_after`, then one probe at a time until one succeeds. Its logic
/// takes the time as an argument, so that it is tested without waiting.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    /// The one request let through after `open_until`, while it runs.
    probing: bool,
}

impl Breaker {
    /// Whether a request may go out at `now`: always while closed; once open past `open_until`,
    /// one probe at a time.
    fn admit(&mut self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now >= until && !self.probing => {
                self.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    /// Whether reads are refused at `now` (open, its probe not due yet).
    fn refuses(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|until| now < until)
    }

    /// The server answered (a missing object is an answer too): closed again.
    fn succeeded(&mut self) {
        *self = Breaker::default();
    }

    /// A request failed at `now`; true when that opened the breaker. A failed probe keeps it open
    /// for another `retry_after`.
    fn failed(&mut self, now: Instant, failures_to_open: u32, retry_after: Duration) -> bool {
        self.failures += 1;
        let probe_failed = self.probing || self.open_until.is_some();
        self.probing = false;
        if !probe_failed && self.failures < failures_to_open {
            return false;
        }
        let was_open = self.open_until.is_some();
        self.open_until = Some(now + retry_after);
        !was_open
    }
}

impl RemoteStats {
    /// Every count of the remote tier, by the name the front ends give it (the Python dict's key;
    /// the C struct's field after `remote_`), as [`crate::tier::TierStats::counts`] is the store's.
    pub fn counts(&self) -> [(&'static str, u64); 11] {
        [
            ("hits", self.hits),
            ("misses", self.misses),
            ("uploads", self.uploads),
            ("upload_bytes", self.upload_bytes),
            ("already_stored", self.already_stored),
            ("dropped", self.dropped),
            ("errors", self.errors),
            ("corrupt", self.corrupt),
            ("mismatched", self.mismatched),
            ("breaker_trips", self.breaker_trips),
            ("upload_bytes_pending", self.upload_bytes_pending),
        ]
    }
}

/// What a store is told of each block whose upload completed.
type UploadedCallback = Box<dyn Fn(BlockKey) + Send>;

/// A remote level: the client, its namespace, and what it learned about keys.
pub struct RemoteTier {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    runtime: Arc<Runtime>,
    location: String,
    /// `<prefix>/<fingerprint hex>`.
    dir: ObjectPath,
    fingerprint: [u8; FINGERPRINT_BYTES],
    block_size: usize,
    config: RemoteConfig,
    known: Mutex<HashMap<BlockKey, Known>>,
    /// Told when keys in flight become known, for lookups that wait on them.
    answered: Condvar,
    reads: Semaphore,
    writes: Semaphore,
    breaker: Mutex<Breaker>,
    stats: Mutex<RemoteStats>,
    /// Signalled when the last pending upload ends.
    idle: Condvar,
    /// Called with each block once its upload is complete.
    on_uploaded: Mutex<Option<UploadedCallback>>,
}

impl RemoteTier {
    /// Build the client (nothing is sent yet: an unreachable store is found out by the first
    /// request, and counted, rather than failing the engine's start).
    pub fn open(config: RemoteConfig, block_size: usize) -> Result<RemoteTier, TierError> {
        let invalid = |why: String| TierError::Config { why };
        if config.concurrency == 0 {
            return Err(invalid("the remote tier needs a concurrency of at least 1".into()));
        }
        if config.timeout.is_zero() {
            return Err(invalid("the remote tier's request timeout must not be zero".into()));
        }
        if block_size == 0 {
            return Err(invalid("the block size must not be zero".into()));
        }
        let location = config.location.to_string();
        let (store, prefix) = build_store(&config)?;
        let fingerprint = fingerprint(&config.namespace, block_size);
        let dir = prefix.clone().join(hex(&fingerprint));
        Ok(RemoteTier {
            inner: Arc::new(Inner {
                store,
                runtime: runtime().map_err(|e| TierError::RemoteUnavailable {
                    location: location.clone(),
                    cause: format!("starting the client's threads: {e}"),
                })?,
                location,
                dir,
                fingerprint,
                block_size,
                reads: Semaphore::new(config.concurrency),
                writes: Semaphore::new(config.concurrency),
                config,
                known: Mutex::new(HashMap::new()),
                answered: Condvar::new(),
                breaker: Mutex::new(Breaker::default()),
                stats: Mutex::new(RemoteStats::default()),
                idle: Condvar::new(),
                on_uploaded: Mutex::new(None),
            }),
        })
    }

    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// The objects' fingerprint, in hex: the directory under the prefix where this namespace's
    /// blocks are.
    pub fn fingerprint(&self) -> String {
        hex(&self.inner.fingerprint)
    }

    /// Where the blocks live (the URL or the directory).
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    pub fn stats(&self) -> RemoteStats {
        let mut stats = self.inner.stats.locked().clone();
        stats.breaker_open = self.inner.breaker.locked().open_until.is_some();
        stats
    }

    /// How many leading `keys` the remote holds, without waiting: a key not asked about yet starts
    /// a lookup of it and those after it (in batches of `concurrency`, stopping at the first
    /// absent one) and answers [`RemoteLookup::Pending`]; asking again once it ends answers
    /// [`RemoteLookup::Found`]. Failures count as absent, and an open breaker answers at once with
    /// what is known.
    pub fn lookup(&self, keys: &[BlockKey]) -> RemoteLookup {
        let inner = &self.inner;
        let now = Instant::now();
        let mut known = inner.known.locked();
        let mut found = 0;
        for key in keys {
            match known.get(key) {
                Some(Known::Present) => found += 1,
                Some(Known::InFlight) => return RemoteLookup::Pending,
                Some(Known::Absent(at)) if now.duration_since(*at) < inner.config.absent_for => break,
                _ => {
                    if !inner.admit() {
                        return RemoteLookup::Found(found);
                    }
                    let ask: Vec<BlockKey> = keys[found..].iter().take(inner.config.max_lookup_keys).copied().collect();
                    remember(&mut known, &ask, Known::InFlight);
                    drop(known);
                    let task = Arc::clone(inner);
                    inner.runtime.spawn(async move { task.ask(ask).await });
                    return RemoteLookup::Pending;
                }
            }
        }
        RemoteLookup::Found(found)
    }

    /// Like [`RemoteTier::lookup`], but waits (until `deadline`) for the answer.
    pub fn lookup_blocking(&self, keys: &[BlockKey], deadline: Deadline) -> Result<usize, TierError> {
        loop {
            if let RemoteLookup::Found(n) = self.lookup(keys) {
                return Ok(n);
            }
            if deadline.expired() {
                return Err(TierError::RemoteUnavailable {
                    location: self.inner.location.clone(),
                    cause: "the lookup did not end by its deadline".into(),
                });
            }
            // Pending means a key is in flight; wait for it to settle unless it did meanwhile.
            let known = self.inner.known.locked();
            if keys.iter().any(|k| matches!(known.get(k), Some(Known::InFlight))) {
                let waited = self.inner.answered.wait_timeout(known, deadline.remaining());
                drop(waited.unwrap_or_else(PoisonError::into_inner));
            }
        }
    }

    /// Queue `data` (one block) for upload under `key`, unless the remote is known to hold it or the
    /// upload budget is spent (then it is dropped and counted). Returns whether it was queued.
    pub fn offer(&self, key: BlockKey, data: &[u8]) -> bool {
        self.offer_with(key, || Bytes::copy_from_slice(data))
    }

    /// [`RemoteTier::offer`] of a block whose bytes `data` gives only once the upload is queued,
    /// so that a block that is dropped or already stored costs no copy (or no lease of its slab).
    pub(crate) fn offer_with(&self, key: BlockKey, data: impl FnOnce() -> Bytes) -> bool {
        let inner = &self.inner;
        let object_bytes = encoded_len(&key, inner.block_size) as u64;
        {
            let mut known = inner.known.locked();
            match known.get(&key) {
                Some(Known::Present) => {
                    inner.stats.locked().already_stored += 1;
                    return false;
                }
                Some(Known::InFlight) => return false,
                _ => {
                    let mut stats = inner.stats.locked();
                    if stats.upload_bytes_pending + object_bytes > inner.config.max_upload_bytes || !inner.admit() {
                        stats.dropped += 1;
                        return false;
                    }
                    stats.upload_bytes_pending += object_bytes;
                    remember(&mut known, &[key], Known::InFlight);
                }
            }
        }
        let data = data();
        debug_assert_eq!(data.len(), inner.block_size);
        let (header, checksum) = encode_parts(&inner.fingerprint, &key, &data);
        let object: PutPayload = [Bytes::from(header), data, Bytes::copy_from_slice(&checksum)].into_iter().collect();
        let task = Arc::clone(inner);
        inner.runtime.spawn(async move { task.upload(key, object, object_bytes).await });
        true
    }

    /// Wait until every queued upload has ended (stored or failed); false if some are still
    /// pending at `deadline`.
    pub fn flush(&self, deadline: Deadline) -> bool {
        let mut stats = self.inner.stats.locked();
        while stats.upload_bytes_pending > 0 {
            if deadline.expired() {
                return false;
            }
            stats = self.inner.idle.wait_timeout(stats, deadline.remaining()).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }

    /// Read blocks into their destinations (one block's length each), each object checked against
    /// its header and checksum as its bytes arrive, waiting until `deadline` at most. A block the
    /// remote does not hold is [`TierError::NotCached`]; a corrupt or mismatched object is counted,
    /// deleted (so that the next store of the block replaces it) and never served. A destination
    /// whose result is an error holds no block (its bytes are unspecified); none is written after
    /// this returns, as every read runs on the calling thread and has ended or been dropped by then.
    pub fn fetch_into(&self, blocks: &mut [(BlockKey, &mut [u8])], deadline: Deadline) -> Vec<Result<(), TierError>> {
        let inner = &self.inner;
        let count = blocks.len();
        let reads = blocks.iter_mut().map(|(key, destination)| inner.fetch_one(*key, destination, deadline));
        let all = futures::future::join_all(reads);
        // The deadline bounds each request; this bounds the whole batch, queueing included.
        let bounded = async {
            tokio::time::timeout_at(deadline.instant().into(), all).await.unwrap_or_else(|_| {
                (0..count)
                    .map(|_| {
                        Err(TierError::RemoteUnavailable {
                            location: inner.location.clone(),
                            cause: "the read did not end by its deadline".into(),
                        })
                    })
                    .collect()
            })
        };
        inner.runtime.block_on(bounded)
    }

    /// Count `keys` as absent (a load of them failed elsewhere): lookups stop at them until
    /// `absent_for` has passed and the remote is asked again.
    pub fn forget(&self, keys: &[BlockKey]) {
        let mut known = self.inner.known.locked();
        let now = Instant::now();
        for key in keys {
            if !matches!(known.get(key), Some(Known::InFlight)) {
                known.insert(*key, Known::Absent(now));
            }
        }
    }

    /// The error every read gets while the breaker is open (before its probe is due), so that a
    /// store makes no room in DRAM for blocks that cannot come.
    pub(crate) fn refusal(&self) -> Option<TierError> {
        self.inner.breaker.locked().refuses(Instant::now()).then(|| self.inner.breaker_open())
    }

    /// Called with each block once its upload completes (a store announces them as events).
    pub(crate) fn set_on_uploaded(&self, callback: UploadedCallback) {
        *self.inner.on_uploaded.locked() = Some(callback);
    }
}

impl std::fmt::Debug for RemoteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTier")
            .field("location", &self.inner.location)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl Inner {
    fn path_of(&self, key: &BlockKey) -> ObjectPath {
        self.dir.clone().join(hex(key.as_bytes()))
    }

    fn unavailable(&self, cause: impl std::fmt::Display) -> TierError {
        TierError::RemoteUnavailable { location: self.location.clone(), cause: cause.to_string() }
    }

    fn breaker_open(&self) -> TierError {
        self.unavailable("the breaker is open after repeated failures")
    }

    /// Whether a request may go out now: always with the breaker closed; once it has been open for
    /// `retry_after`, one probe at a time.
    fn admit(&self) -> bool {
        self.breaker.locked().admit(Instant::now())
    }

    /// The server answered (a missing object is an answer too).
    fn succeeded(&self) {
        self.breaker.locked().succeeded();
    }

    fn failed(&self, error: &TierError) {
        let config = &self.config;
        let tripped = self.breaker.locked().failed(Instant::now(), config.failures_to_open, config.retry_after);
        let mut stats = self.stats.locked();
        stats.errors += 1;
        stats.last_error = Some(error.to_string());
        if tripped {
            stats.breaker_trips += 1;
            tracing::warn!(
                "the remote tier at {} stops sending requests for {:?}: {error}",
                self.location,
                self.config.retry_after
            );
        }
    }

    /// One request with its deadline, its outcome fed to the breaker; `Ok(None)` is "not there".
    async fn request<T>(
        &self,
        deadline: Instant,
        op: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<Option<T>, TierError> {
        let outcome = match tokio::time::timeout_at(deadline.into(), op).await {
            Ok(Ok(value)) => Ok(Some(value)),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(self.unavailable(with_sources(&e))),
            Err(_) => Err(self.unavailable("the request did not end by its deadline")),
        };
        match &outcome {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        outcome
    }

    /// Ask about `keys` in prefix order, `concurrency` at a time, until one is absent; keys not
    /// asked about are forgotten (a later lookup asks again).
    async fn ask(self: Arc<Self>, keys: Vec<BlockKey>) {
        let mut results: Vec<(BlockKey, Known)> = Vec::with_capacity(keys.len());
        let mut done = 0;
        for batch in keys.chunks(self.config.concurrency) {
            let heads = batch.iter().map(|key| {
                let path = self.path_of(key);
                let this = &self;
                async move {
                    let _permit = this.reads.acquire().await;
                    let deadline = Instant::now() + this.config.timeout;
                    this.request(deadline, this.store.head(&path)).await
                }
            });
            let answers = futures::future::join_all(heads).await;
            let mut absent = false;
            for (key, answer) in batch.iter().zip(answers) {
                let state = match answer {
                    Ok(Some(_)) => Known::Present,
                    _ => {
                        absent = true;
                        Known::Absent(Instant::now())
                    }
                };
                results.push((*key, state));
            }
            done += batch.len();
            if absent || !self.admit_next() {
                break;
            }
        }
        let misses = results.iter().filter(|(_, k)| matches!(k, Known::Absent(_))).count() as u64;
        self.stats.locked().misses += misses;
        self.settle(|known| {
            for (key, state) in results {
                known.insert(key, state);
            }
            for key in &keys[done..] {
                if matches!(known.get(key), Some(Known::InFlight)) {
                    known.remove(key);
                }
            }
        });
    }

    /// Change what is known of keys a lookup may be waiting on, and wake such lookups
    /// ([`RemoteTier::lookup_blocking`]).
    fn settle(&self, change: impl FnOnce(&mut HashMap<BlockKey, Known>)) {
        change(&mut self.known.locked());
        self.answered.notify_all();
    }

    /// Whether a lookup goes on to its next batch: not while the breaker is open.
    fn admit_next(&self) -> bool {
        self.breaker.locked().open_until.is_none()
    }

    /// Store one object unless the remote has it: a conditional create (`If-None-Match: *`), one
    /// request whatever the answer, where a HEAD first would add a round trip to every new block.
    /// A server that ignores the condition replaces the object with one of the same block.
    async fn upload(self: Arc<Self>, key: BlockKey, object: PutPayload, bytes: u64) {
        let outcome = {
            let _permit = self.writes.acquire().await;
            let deadline = Instant::now() + self.config.timeout;
            let path = self.path_of(&key);
            let put = async {
                match self.store.put_opts(&path, object.clone(), PutMode::Create.into()).await {
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                    // A client configured without conditional puts (`aws_conditional_put=disabled`).
                    Err(object_store::Error::NotImplemented { .. }) => {
                        self.store.put(&path, object).await.map(|_| true)
                    }
                    other => other.map(|_| true),
                }
            };
            match self.request(deadline, put).await {
                Ok(Some(stored)) => Ok(stored),
                Ok(None) => {
                    let e = self.unavailable("the store answered the upload with \"not found\" (is the bucket there?)");
                    self.failed(&e);
                    Err(e)
                }
                Err(e) => Err(e),
            }
        };
        let uploaded = matches!(outcome, Ok(true));
        let state = if outcome.is_ok() { Known::Present } else { Known::Absent(Instant::now()) };
        self.settle(|known| remember(known, &[key], state));
        // Announced before the upload stops counting as pending, so that whoever `flush`es sees
        // the events of every upload it waited for.
        if uploaded && let Some(callback) = &*self.on_uploaded.locked() {
            callback(key);
        }
        {
            let mut stats = self.stats.locked();
            match outcome {
                Ok(true) => {
                    stats.uploads += 1;
                    stats.upload_bytes += self.block_size as u64;
                }
                Ok(false) => stats.already_stored += 1,
                Err(_) => {}
            }
            stats.upload_bytes_pending -= bytes;
            if stats.upload_bytes_pending == 0 {
                self.idle.notify_all();
            }
        }
    }

    async fn fetch_one(&self, key: BlockKey, destination: &mut [u8], deadline: Deadline) -> Result<(), TierError> {
        if destination.len() != self.block_size {
            return Err(TierError::BadBlock {
                index: 0,
                why: format!("a destination of {} bytes for blocks of {}", destination.len(), self.block_size),
            });
        }
        if !self.admit() {
            return Err(self.breaker_open());
        }
        let _permit = self.reads.acquire().await;
        let path = self.path_of(&key);
        let request_deadline = deadline.instant().min(Instant::now() + self.config.timeout);
        let expected = encoded_len(&key, self.block_size) as u64;
        let mut reader = ObjectReader::new(&self.fingerprint, &key, destination);
        // The stream's errors are the server's; the reader's (a bad object) end the read at once.
        let got = self
            .request(request_deadline, async {
                let object = self.store.get(&path).await?;
                if object.meta.size > expected {
                    return Ok(Err(reader.corrupt("it is longer than one block of this store's size")));
                }
                // A file is read whole on the client's blocking threads, where its stream would
                // take one trip to them per 8 KiB; a response is taken as its chunks arrive.
                if matches!(object.payload, GetResultPayload::File(..)) {
                    return Ok(reader.feed(&object.bytes().await?));
                }
                let mut stream = object.into_stream();
                while let Some(chunk) = stream.next().await {
                    if let Err(e) = reader.feed(&chunk?) {
                        return Ok(Err(e));
                    }
                }
                Ok(Ok(()))
            })
            .await;
        let checked = match got {
            Ok(Some(Ok(()))) => reader.finish(),
            Ok(Some(Err(bad))) => Err(bad),
            Ok(None) => {
                self.stats.locked().misses += 1;
                self.settle(|known| remember(known, &[key], Known::Absent(Instant::now())));
                return Err(TierError::NotCached { key });
            }
            Err(e) => return Err(e),
        };
        match checked {
            Ok(()) => {
                self.stats.locked().hits += 1;
                self.settle(|known| remember(known, &[key], Known::Present));
                Ok(())
            }
            Err(e) => {
                {
                    let mut stats = self.stats.locked();
                    match e {
                        TierError::RemoteMismatch { .. } => stats.mismatched += 1,
                        _ => stats.corrupt += 1,
                    }
                    stats.last_error = Some(e.to_string());
                }
                self.settle(|known| remember(known, &[key], Known::Absent(Instant::now())));
                // Best effort: a store of the block by any engine replaces it either way.
                let _ = tokio::time::timeout_at(request_deadline.into(), self.store.delete(&path)).await;
                Err(e)
            }
        }
    }
}

/// An error and its causes: the client's own message often ends at "HTTP error", the reason
/// (connection refused, a TLS failure) is further down.
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

fn remember(known: &mut HashMap<BlockKey, Known>, keys: &[BlockKey], state: Known) {
    if known.len() + keys.len() > MAX_KNOWN_KEYS {
        // Starting over forgets only what a lookup can ask again; uploads in flight stay marked.
        known.retain(|_, k| matches!(k, Known::InFlight));
    }
    for key in keys {
        known.insert(*key, state);
    }
}

/// The process's client threads: one runtime for every remote tier, so that their number does not
/// grow with the stores. Made again in a forked child, where the parent's threads do not exist.
fn runtime() -> std::io::Result<Arc<Runtime>> {
    static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);
    let mut slot = RUNTIME.locked();
    let pid = std::process::id();
    if let Some((owner, runtime)) = &*slot {
        if *owner == pid {
            return Ok(Arc::clone(runtime));
        }
        // The parent's runtime: its threads are not in this process, so it cannot be shut down.
        if let Some((_, stale)) = slot.take() {
            std::mem::forget(stale);
        }
    }
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(16)
            .thread_name("kvferry-remote")
            .enable_all()
            .build()?,
    );
    *slot = Some((pid, Arc::clone(&runtime)));
    Ok(runtime)
}

fn build_store(config: &RemoteConfig) -> Result<(Arc<dyn ObjectStore>, ObjectPath), TierError> {
    let location = config.location.to_string();
    let unusable = |cause: String| TierError::RemoteUnavailable { location: location.clone(), cause };
    let retry = object_store::RetryConfig { max_retries: 2, retry_timeout: config.timeout, ..Default::default() };
    match &config.location {
        RemoteLocation::Path(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| unusable(format!("creating the directory: {e}")))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| unusable(e.to_string()))?
                .with_automatic_cleanup(true);
            if !config.options.is_empty() {
                return Err(TierError::Config { why: "a shared directory takes no client options".into() });
            }
            Ok((Arc::new(store), ObjectPath::default()))
        }
        RemoteLocation::Url(url) => {
            let parsed =
                url::Url::parse(url).map_err(|e| TierError::Config { why: format!("the remote URL {url:?}: {e}") })?;
            let prefix = ObjectPath::parse(parsed.path().trim_matches('/'))
                .map_err(|e| TierError::Config { why: format!("the remote URL's path: {e}") })?;
            match parsed.scheme() {
                "s3" | "s3a" => {
                    use object_store::ClientConfigKey;
                    use object_store::aws::AmazonS3ConfigKey;
                    // Through `with_config`, which keeps the environment's other client settings
                    // (AWS_ALLOW_HTTP, proxies) that a whole new ClientOptions would drop.
                    let millis = |d: Duration| format!("{}ms", d.as_millis());
                    let mut builder = object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url.clone())
                        .with_retry(retry)
                        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), millis(config.timeout))
                        .with_config(
                            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                            millis(config.timeout.min(Duration::from_secs(2))),
                        );
                    for (key, value) in &config.options {
                        let key: AmazonS3ConfigKey = key
                            .parse()
                            .map_err(|e| TierError::Config { why: format!("the remote tier's option {key:?}: {e}") })?;
                        builder = builder.with_config(key, value);
                    }
                    let store = builder.build().map_err(|e| TierError::Config { why: e.to_string() })?;
                    Ok((Arc::new(store), prefix))
                }
                "file" => {
                    let dir = parsed
                        .to_file_path()
                        .map_err(|()| TierError::Config { why: format!("{url:?} names no local directory") })?;
                    build_store(&RemoteConfig { location: RemoteLocation::Path(dir), ..config.clone() })
                }
                other => Err(TierError::Config {
                    why: format!("the remote tier takes s3:// or file:// URLs (or a path), not {other}://"),
                }),
            }
        }
    }
}

/// The namespace's fingerprint: what every object of it carries and is filed under.
fn fingerprint(namespace: &str, block_size: usize) -> [u8; FINGERPRINT_BYTES] {
    let mut hasher = Sha256::new();
    hasher.update(b"kvferry remote tier v1\0");
    hasher.update((block_size as u64).to_le_bytes());
    hasher.update(namespace.as_bytes());
    let digest = hasher.finalize();
    let mut out = [0; FINGERPRINT_BYTES];
    out.copy_from_slice(&digest[..FINGERPRINT_BYTES]);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn encoded_len(key: &BlockKey, data_len: usize) -> usize {
    FIXED_HEADER_BYTES + key.as_bytes().len() + 8 + data_len + CHECKSUM_BYTES
}

/// The header of `key`'s object, and the checksum that ends an object of that header and `data`.
fn encode_parts(fingerprint: &[u8; FINGERPRINT_BYTES], key: &BlockKey, data: &[u8]) -> (Vec<u8>, [u8; CHECKSUM_BYTES]) {
    let key_bytes = key.as_bytes();
    let header_len = FIXED_HEADER_BYTES + key_bytes.len() + 8;
    let mut header = Vec::with_capacity(header_len);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(header_len as u16).to_le_bytes());
    header.extend_from_slice(fingerprint);
    header.push(key_bytes.len() as u8);
    header.extend_from_slice(key_bytes);
    header.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut hasher = Xxh3::new();
    hasher.update(&header);
    hasher.update(data);
    (header, hasher.digest().to_le_bytes())
}

/// One block as an object: header, data, checksum. (Tests and the fuzzer; the tier streams both.)
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn encode_object(fingerprint: &[u8; FINGERPRINT_BYTES], key: &BlockKey, data: &[u8]) -> Vec<u8> {
    let (header, checksum) = encode_parts(fingerprint, key, data);
    [&header[..], data, &checksum].concat()
}

/// Check an object read back whole for `key` and return its block, or why it must not be served.
/// (Tests and the fuzzer; the tier streams both.)
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn decode_object(
    object: &[u8],
    fingerprint: &[u8; FINGERPRINT_BYTES],
    key: &BlockKey,
    block_size: usize,
) -> Result<Vec<u8>, TierError> {
    let mut block = vec![0; block_size];
    let mut reader = ObjectReader::new(fingerprint, key, &mut block);
    reader.feed(object)?;
    reader.finish()?;
    Ok(block)
}

/// Where an [`ObjectReader`] is in its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Collecting the header, whose length is known once its fixed part is in.
    Header {
        len: usize,
    },
    Data {
        written: usize,
    },
    Checksum {
        have: usize,
    },
}

/// One object checked as its bytes arrive, in pieces of any size: the header into a small buffer,
/// the data straight into the block's destination, the checksum last. Nothing in it is trusted:
/// every length is checked before a byte is placed, so an object can neither write past the
/// destination nor pass as a shorter block, and a byte beyond the checksum fails it at once. What
/// lands in the destination is the block only if [`ObjectReader::finish`] says so.
pub(crate) struct ObjectReader<'a> {
    fingerprint: &'a [u8; FINGERPRINT_BYTES],
    key: &'a BlockKey,
    destination: &'a mut [u8],
    header: Vec<u8>,
    checksum: [u8; CHECKSUM_BYTES],
    part: Part,
    hasher: Xxh3,
}

impl<'a> ObjectReader<'a> {
    /// A reader of `key`'s object whose block (of `destination`'s length) goes to `destination`.
    pub(crate) fn new(fingerprint: &'a [u8; FINGERPRINT_BYTES], key: &'a BlockKey, destination: &'a mut [u8]) -> Self {
        ObjectReader {
            fingerprint,
            key,
            destination,
            header: Vec::with_capacity(FIXED_HEADER_BYTES + MAX_KEY_BYTES + 8),
            checksum: [0; CHECKSUM_BYTES],
            part: Part::Header { len: FIXED_HEADER_BYTES },
            hasher: Xxh3::new(),
        }
    }

    fn corrupt(&self, why: &str) -> TierError {
        TierError::RemoteCorrupt { key: *self.key, why: why.to_string() }
    }

    /// Take the object's next bytes.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<(), TierError> {
        while !bytes.is_empty() {
            let taken = match self.part {
                Part::Header { len } => {
                    let take = (len - self.header.len()).min(bytes.len());
                    self.header.extend_from_slice(&bytes[..take]);
                    self.hasher.update(&bytes[..take]);
                    if self.header.len() == len {
                        self.part = self.header_read()?;
                    }
                    take
                }
                Part::Data { written } => {
                    let take = (self.destination.len() - written).min(bytes.len());
                    let into = &mut self.destination[written..written + take];
                    into.copy_from_slice(&bytes[..take]);
                    // Hashed where it landed, while it is still in cache.
                    self.hasher.update(into);
                    let written = written + take;
                    self.part = if written == self.destination.len() {
                        Part::Checksum { have: 0 }
                    } else {
                        Part::Data { written }
                    };
                    take
                }
                Part::Checksum { have } => {
                    if bytes.len() > CHECKSUM_BYTES - have {
                        return Err(self.corrupt("it is longer than one block of this store's size"));
                    }
                    self.checksum[have..have + bytes.len()].copy_from_slice(bytes);
                    self.part = Part::Checksum { have: have + bytes.len() };
                    bytes.len()
                }
            };
            bytes = &bytes[taken..];
        }
        Ok(())
    }

    /// The header's fixed part is in (then the rest of the header is due) or all of it (then the
    /// data): what comes next, or why the object must not be served.
    fn header_read(&self) -> Result<Part, TierError> {
        let header = &self.header[..];
        if header.len() == FIXED_HEADER_BYTES {
            if &header[..4] != MAGIC {
                return Err(self.corrupt("it does not start with kvferry's magic"));
            }
            let version = u16::from_le_bytes([header[4], header[5]]);
            if version != VERSION {
                return Err(TierError::RemoteMismatch {
                    key: *self.key,
                    why: format!("it has format version {version}"),
                });
            }
            let header_len = u16::from_le_bytes([header[6], header[7]]) as usize;
            let key_len = header[FIXED_HEADER_BYTES - 1] as usize;
            if key_len == 0 || key_len > MAX_KEY_BYTES || header_len != FIXED_HEADER_BYTES + key_len + 8 {
                return Err(self.corrupt("its header length or key length is invalid"));
            }
            return Ok(Part::Header { len: header_len });
        }
        let data_len = u64::from_le_bytes(header[header.len() - 8..].try_into().expect("8 bytes"));
        if data_len != self.destination.len() as u64 {
            return Err(self.corrupt("its length is not one block of this store's size"));
        }
        Ok(if self.destination.is_empty() { Part::Checksum { have: 0 } } else { Part::Data { written: 0 } })
    }

    /// The object has ended: whether the destination holds its block.
    pub(crate) fn finish(self) -> Result<(), TierError> {
        if self.part != (Part::Checksum { have: CHECKSUM_BYTES }) {
            return Err(self.corrupt("it is shorter than one block of this store's size"));
        }
        if self.hasher.digest() != u64::from_le_bytes(self.checksum) {
            return Err(self.corrupt("it failed its checksum"));
        }
        // Checked after the checksum: an intact object of another namespace or key is a mismatch.
        if &self.header[8..8 + FINGERPRINT_BYTES] != self.fingerprint {
            return Err(TierError::RemoteMismatch { key: *self.key, why: "it belongs to another namespace".into() });
        }
        if &self.header[FIXED_HEADER_BYTES..self.header.len() - 8] != self.key.as_bytes() {
            return Err(TierError::RemoteMismatch { key: *self.key, why: "its header names another block".into() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_probes_one_at_a_time() {
        let (start, retry) = (Instant::now(), Duration::from_secs(5));
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut b = Breaker::default();
        assert!(b.admit(at(0)) && !b.failed(at(0), 3, retry) && !b.failed(at(0), 3, retry));
        b.succeeded();
        assert!(!b.failed(at(1), 3, retry) && !b.failed(at(1), 3, retry), "a success starts the count again");
        assert!(b.failed(at(1), 3, retry), "the third failure in a row opens it");
        assert!(b.refuses(at(5)) && !b.admit(at(5)), "no request before retry_after");
        assert!(b.admit(at(6)) && !b.admit(at(6)), "then one probe at a time");
        assert!(!b.failed(at(6), 3, retry), "a failed probe keeps it open (no new trip)");
        assert!(b.refuses(at(10)) && !b.admit(at(10)), "for another retry_after");
        assert!(b.admit(at(11)));
        b.succeeded();
        assert!(!b.refuses(at(11)) && b.admit(at(11)) && b.admit(at(11)), "a probe that succeeds closes it");
    }

    fn key(n: u8) -> BlockKey {
        BlockKey::from_engine_hash(&[n; 16]).unwrap()
    }

    #[test]
    fn an_object_round_trips_and_every_flipped_byte_is_refused() {
        let fp = fingerprint("model-a", 64);
        let data: Vec<u8> = (0..64u8).collect();
        let object = encode_object(&fp, &key(1), &data);
        assert_eq!(decode_object(&object, &fp, &key(1), 64).unwrap(), data);
        // However the bytes arrive: one at a time, in pieces that straddle the parts.
        for piece in [1, 7, 60, 200] {
            let (mut block, key) = (vec![0; 64], key(1));
            let mut reader = ObjectReader::new(&fp, &key, &mut block);
            object.chunks(piece).try_for_each(|chunk| reader.feed(chunk)).unwrap();
            reader.finish().unwrap();
            assert_eq!(block, data, "read in pieces of {piece}");
        }
        let mut long = object.clone();
        long.push(0);
        assert!(matches!(decode_object(&long, &fp, &key(1), 64), Err(TierError::RemoteCorrupt { .. })));
        for i in 0..object.len() {
            let mut bad = object.clone();
            bad[i] ^= 0x10;
            assert!(decode_object(&bad, &fp, &key(1), 64).is_err(), "a flip at byte {i} was served");
        }
        for len in 0..object.len() {
            assert!(decode_object(&object[..len], &fp, &key(1), 64).is_err(), "a cut at {len} was served");
        }
    }

    #[test]
    fn another_namespace_key_or_block_size_is_a_mismatch_not_data() {
        let fp = fingerprint("model-a", 64);
        let object = encode_object(&fp, &key(1), &[7; 64]);
        let other = fingerprint("model-b", 64);
        assert!(matches!(decode_object(&object, &other, &key(1), 64), Err(TierError::RemoteMismatch { .. })));
        assert!(matches!(decode_object(&object, &fp, &key(2), 64), Err(TierError::RemoteMismatch { .. })));
        assert!(matches!(decode_object(&object, &fp, &key(1), 128), Err(TierError::RemoteCorrupt { .. })));
        assert_ne!(fingerprint("model-a", 64), fingerprint("model-a", 128));
    }

    /// Read `keys` through `fetch_into`, each into a buffer of its own.
    fn fetch(tier: &RemoteTier, keys: &[BlockKey]) -> Vec<Result<Vec<u8>, TierError>> {
        let mut buffers = vec![vec![0; tier.block_size()]; keys.len()];
        let mut blocks: Vec<(BlockKey, &mut [u8])> =
            keys.iter().copied().zip(buffers.iter_mut().map(Vec::as_mut_slice)).collect();
        let results = tier.fetch_into(&mut blocks, Deadline::after(Duration::from_secs(20)));
        results.into_iter().zip(buffers).map(|(result, buffer)| result.map(|()| buffer)).collect()
    }

    fn shared_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvferry-remote-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn blocks_offered_by_one_client_are_found_and_read_by_another() {
        let dir = shared_dir("two-clients");
        let config = RemoteConfig::new(RemoteLocation::Path(dir.clone()), "model-a/rank0");
        let writer = RemoteTier::open(config.clone(), 4096).unwrap();
        let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i ^ 0x5a; 4096]).collect();
        for (i, block) in data.iter().enumerate() {
            assert!(writer.offer(key(i as u8), block));
        }
        assert!(writer.flush(Deadline::after(Duration::from_secs(10))));
        assert_eq!(writer.stats().uploads, 4);
        // Offered again: known present, not uploaded twice.
        assert!(!writer.offer(key(0), &data[0]));

        let reader = RemoteTier::open(config, 4096).unwrap();
        let keys: Vec<BlockKey> = (0..6).map(key).collect();
        assert_eq!(reader.lookup(&keys), RemoteLookup::Pending);
        assert_eq!(reader.lookup_blocking(&keys, Deadline::after(Duration::from_secs(10))).unwrap(), 4);
        let fetched = fetch(&reader, &keys[..5]);
        for (i, got) in fetched.iter().take(4).enumerate() {
            assert_eq!(&got.as_ref().unwrap()[..], &data[i][..]);
        }
        assert!(matches!(fetched[4], Err(TierError::NotCached { .. })));
        // A block the directory holds is not uploaded again: the reader knows it is there, and a
        // client that never looked finds out before uploading.
        assert!(!reader.offer(key(1), &data[1]));
        let third =
            RemoteTier::open(RemoteConfig::new(RemoteLocation::Path(dir.clone()), "model-a/rank0"), 4096).unwrap();
        assert!(third.offer(key(1), &data[1]));
        assert!(third.flush(Deadline::after(Duration::from_secs(10))));
        for tier in [&reader, &third] {
            let stats = tier.stats();
            assert_eq!((stats.uploads, stats.already_stored), (0, 1));
        }
        // A load that failed elsewhere makes the reader stop counting the block, until asked again.
        reader.forget(&keys[1..2]);
        assert_eq!(reader.lookup(&keys), RemoteLookup::Found(1));
        // Another namespace sees none of it.
        let other =
            RemoteTier::open(RemoteConfig::new(RemoteLocation::Path(dir.clone()), "model-b/rank0"), 4096).unwrap();
        assert_eq!(other.lookup_blocking(&keys, Deadline::after(Duration::from_secs(10))).unwrap(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_object_is_counted_deleted_and_never_served() {
        let dir = shared_dir("corrupt");
        let config = RemoteConfig::new(RemoteLocation::Path(dir.clone()), "ns");
        let tier = RemoteTier::open(config, 4096).unwrap();
        assert!(tier.offer(key(1), &[1; 4096]));
        assert!(tier.flush(Deadline::after(Duration::from_secs(10))));
        let file = dir.join(tier.fingerprint()).join(hex(key(1).as_bytes()));
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let got = fetch(&tier, &[key(1)]);
        assert!(matches!(got[0], Err(TierError::RemoteCorrupt { .. })));
        assert_eq!(tier.stats().corrupt, 1);
        assert!(!file.exists(), "the corrupt object was left for others to read");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unreachable_store_opens_the_breaker_and_drops_offers_without_waiting() {
        // A port nothing listens on: every request fails at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let config = RemoteConfig::new(RemoteLocation::Url("s3://kv/prefix".into()), "ns")
            .with_option("aws_endpoint", format!("http://127.0.0.1:{port}"))
            .with_option("aws_allow_http", "true")
            .with_option("aws_region", "local")
            .with_option("aws_access_key_id", "id")
            .with_option("aws_secret_access_key", "secret")
            .with_timeout(Duration::from_secs(2))
            .with_breaker(2, Duration::from_secs(60));
        let tier = RemoteTier::open(config, 4096).unwrap();
        let keys: Vec<BlockKey> = (0..3).map(key).collect();
        // One batch asks about all three at once: two failures open the breaker.
        assert_eq!(tier.lookup_blocking(&keys, Deadline::after(Duration::from_secs(20))).unwrap(), 0);
        let stats = tier.stats();
        assert!(stats.breaker_open && stats.breaker_trips == 1, "{stats:?}");
        assert!(stats.errors >= 2, "{stats:?}");
        // The reason itself, not only the client's summary of it.
        assert!(stats.last_error.as_deref().is_some_and(|e| e.contains("onnect")), "{stats:?}");
        // Open: nothing is sent, nothing is queued, reads fail at once.
        assert_eq!(tier.lookup(&[key(7)]), RemoteLookup::Found(0));
        assert!(!tier.offer(key(9), &[0; 4096]));
        assert_eq!(tier.stats().dropped, 1);
        let got = fetch(&tier, &keys[..1]);
        assert!(matches!(got[0], Err(TierError::RemoteUnavailable { .. })));
    }
}
