//! `TierStore`, `StoreOp`, `TierEvent` and the block key functions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kvferry_core::tier::{BlockRegions, StoreOptions};
use kvferry_core::{
    BlockKey, CopyFence, Deadline, Device, Error, ErrorCode, HostDevice, Medium, MemKind, MemRegion,
    TierEvent as CoreTierEvent, TierStore as CoreTierStore,
};
use pyo3::exceptions::{PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::closable::Closable;
use crate::convert::{Span, deadline, parse_device};
use crate::errors::{OrRaise, exception};

/// A block of a put or get as Python passes it: its key and its `(addr, length)` regions.
type PyBlock = (PyBackedBytes, Vec<Span>);

/// Which store operation a `put` or `get` runs.
#[derive(Clone, Copy)]
enum Op {
    Put,
    Get,
    /// Host memory straight to the disk tier, and back.
    PutToDisk,
    GetFromDisk,
}

struct StoreState {
    store: CoreTierStore,
    /// Copies between caller memory and the arena, one device per kind of caller memory.
    devices: Mutex<HashMap<MemKind, Arc<dyn Device>>>,
    events: Option<Mutex<Receiver<CoreTierEvent>>>,
}

impl StoreState {
    fn device(&self, kind: MemKind) -> kvferry_core::Result<Arc<dyn Device>> {
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(device) = devices.get(&kind) {
            return Ok(device.clone());
        }
        let device: Arc<dyn Device> = match kind {
            MemKind::Host => Arc::new(HostDevice::new()?),
            #[cfg(feature = "cuda")]
            MemKind::Cuda { device } => Arc::new(kvferry_core::CudaDevice::open(device)?),
            other => {
                return Err(Error::Unsupported {
                    what: format!("a store copy to or from {other} memory"),
                    why: "this build of kvferry has no driver for it".into(),
                });
            }
        };
        devices.insert(kind, device.clone());
        Ok(device)
    }
}

/// Pinned DRAM blocks backed by an optional disk directory, found again by prefix keys.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct TierStore {
    block_size: usize,
    state: Closable<Arc<StoreState>>,
}

impl TierStore {
    fn state(&self) -> PyResult<Arc<StoreState>> {
        self.state.get()
    }

    fn submit(&self, py: Python<'_>, blocks: Vec<PyBlock>, device: &str, op: Op) -> PyResult<StoreOp> {
        let kind = parse_device(device)?;
        if matches!(op, Op::PutToDisk | Op::GetFromDisk) && kind != MemKind::Host {
            return Err(PyValueError::new_err(format!(
                "to_disk and from_disk move host memory (device=\"cpu\"), not {device:?}"
            )));
        }
        let blocks: Vec<BlockRegions> = blocks
            .into_iter()
            .map(|(key, regions)| {
                let regions = regions.into_iter().map(|[addr, len]| MemRegion { addr, len, kind }).collect();
                Ok((block_key(&key)?, regions))
            })
            .collect::<PyResult<_>>()?;
        let state = self.state()?;
        let fence = py.detach(|| {
            // SAFETY: the caller keeps the regions valid (and, for a get, unread and not
            // overlapping) until the operation completes, as documented on put and get.
            unsafe {
                match op {
                    Op::Put => state.store.put(state.device(kind)?, blocks),
                    Op::Get => state.store.get(state.device(kind)?, blocks),
                    Op::PutToDisk => state.store.put_to_disk(blocks),
                    Op::GetFromDisk => state.store.get_from_disk(blocks),
                }
            }
        });
        Ok(StoreOp { fence: fence.or_raise()? })
    }
}

fn block_key(bytes: &[u8]) -> PyResult<BlockKey> {
    BlockKey::from_engine_hash(bytes).map_err(Error::from).or_raise()
}

fn block_keys(keys: &[PyBackedBytes]) -> PyResult<Vec<BlockKey>> {
    keys.iter().map(|k| block_key(k)).collect()
}

#[pymethods]
impl TierStore {
    #[new]
    #[pyo3(signature = (block_size, dram_capacity, *, disk_dir = None, disk_capacity = 0, policy = "lru", admit_after = 1, workers = None, pin = true, events = true, disk_queue_depth = None, sync_writes = false, remote = None))]
    #[allow(clippy::too_many_arguments, reason = "the constructor's keyword arguments")]
    fn new(
        py: Python<'_>,
        block_size: usize,
        dram_capacity: u64,
        disk_dir: Option<PathBuf>,
        disk_capacity: u64,
        policy: &str,
        admit_after: u8,
        workers: Option<usize>,
        pin: bool,
        events: bool,
        disk_queue_depth: Option<usize>,
        sync_writes: bool,
        remote: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        // The keyword arguments as the store options every front end gives (StoreOptions::parse).
        let mut options: Vec<(String, String)> = vec![
            ("block_size".into(), block_size.to_string()),
            ("host_capacity".into(), dram_capacity.to_string()),
            ("policy".into(), policy.to_string()),
            ("pin".into(), pin.to_string()),
            ("events".into(), events.to_string()),
            ("disk.admit_after".into(), admit_after.to_string()),
            ("disk.sync_writes".into(), sync_writes.to_string()),
        ];
        options.extend(workers.map(|n| ("workers".into(), n.to_string())));
        options.extend(disk_queue_depth.map(|n| ("disk.queue_depth".into(), n.to_string())));
        if disk_dir.is_some() || disk_capacity != 0 {
            options.push(("disk.capacity".into(), disk_capacity.to_string()));
        }
        if let Some(dir) = disk_dir {
            // Options are text: a path that is not would name another directory if converted.
            let dir = dir.to_str().ok_or_else(|| PyValueError::new_err("disk_dir must be valid UTF-8"))?;
            options.push(("disk.dir".into(), dir.to_string()));
        }
        if let Some(remote) = remote {
            let remote = crate::remote::remote_options(&remote)?;
            options.extend(remote.into_iter().map(|(k, v)| (format!("remote.{k}"), v)));
        }
        let StoreOptions { config, events } =
            StoreOptions::parse(options.iter().map(|(k, v)| (k.as_str(), v.as_str()))).or_raise()?;
        let store = py.detach(|| CoreTierStore::open(config)).or_raise()?;
        let events = events.then(|| Mutex::new(store.subscribe()));
        let state = StoreState { store, devices: Mutex::default(), events };
        Ok(TierStore { block_size, state: Closable::new("tier store", Arc::new(state)) })
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.block_size
    }

    /// Copy blocks into the store; returns at once. The memory must stay valid and unchanged until
    /// the operation completes. With `to_disk`, each block (one 4096-aligned host region) is written
    /// straight to the disk tier and never held in DRAM.
    #[pyo3(signature = (blocks, *, device = "cpu", to_disk = false))]
    fn put(&self, py: Python<'_>, blocks: Vec<PyBlock>, device: &str, to_disk: bool) -> PyResult<StoreOp> {
        self.submit(py, blocks, device, if to_disk { Op::PutToDisk } else { Op::Put })
    }

    /// Copy cached blocks out into caller memory; returns at once. The memory must stay valid and
    /// must not be read until the operation completes. With `from_disk`, each block (one
    /// 4096-aligned host region) is read from the disk tier straight into it, not promoted to DRAM.
    #[pyo3(signature = (blocks, *, device = "cpu", from_disk = false))]
    fn get(&self, py: Python<'_>, blocks: Vec<PyBlock>, device: &str, from_disk: bool) -> PyResult<StoreOp> {
        self.submit(py, blocks, device, if from_disk { Op::GetFromDisk } else { Op::Get })
    }

    /// Where each block of the longest cached prefix of `keys` is: "CPU" or "DISK".
    fn lookup(&self, keys: Vec<PyBackedBytes>) -> PyResult<Vec<&'static str>> {
        let keys = block_keys(&keys)?;
        Ok(self.state()?.store.lookup(&keys).into_iter().map(|m| m.as_str()).collect())
    }

    /// As `lookup`, then the remote tier for the blocks after the local prefix ("REMOTE"); None
    /// while the remote is being asked (ask again). Never waits on the network.
    fn lookup_remote(&self, keys: Vec<PyBackedBytes>) -> PyResult<Option<Vec<&'static str>>> {
        let keys = block_keys(&keys)?;
        Ok(self.state()?.store.lookup_remote(&keys).map(|found| found.into_iter().map(|m| m.as_str()).collect()))
    }

    /// Wait until every block queued for the remote tier is uploaded (or failed), `timeout`
    /// seconds at most; False if some are still pending. True without a remote tier.
    fn flush_remote(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let until = deadline(timeout)?;
        let state = self.state()?;
        Ok(py.detach(|| state.store.remote().is_none_or(|remote| remote.flush(until))))
    }

    /// The keys of every block on the disk tier, in slot order; right after opening, what the
    /// directory's index log held (an empty list without a disk tier).
    fn disk_keys<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let keys = self.state()?.store.disk_keys();
        Ok(keys.iter().map(|k| PyBytes::new(py, k.as_bytes())).collect())
    }

    fn offload(&self, py: Python<'_>, keys: Vec<PyBackedBytes>) -> PyResult<StoreOp> {
        let keys = block_keys(&keys)?;
        let state = self.state()?;
        let fence = py.detach(|| state.store.offload(keys)).or_raise()?;
        Ok(StoreOp { fence })
    }

    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        let state = self.state()?;
        py.detach(|| state.store.clear()).or_raise()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.state()?.store.stats();
        let dict = PyDict::new(py);
        dict.set_item("block_size", self.block_size)?;
        for (name, count) in stats.counts() {
            dict.set_item(name, count)?;
        }
        dict.set_item("disk_failed", stats.disk_failure.is_some())?;
        dict.set_item("io_fallback", stats.io_fallback.is_some())?;
        let remote = stats.remote.as_ref().map(|r| crate::remote::stats_dict(py, r)).transpose()?;
        dict.set_item("remote", remote)?;
        Ok(dict)
    }

    /// Events since the last call, one per change (a change may name many keys); never blocks.
    fn take_events(&self) -> PyResult<Vec<TierEvent>> {
        let state = self.state()?;
        let Some(receiver) = &state.events else {
            return Err(PyValueError::new_err("the store was opened with events=False"));
        };
        let receiver = receiver.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(receiver.try_iter().map(TierEvent::from).collect())
    }

    /// Publish the store's events from now on over ZMQ as vLLM's KV events, until the returned
    /// publisher is closed or dropped.
    #[cfg(feature = "kv-events")]
    #[pyo3(signature = (endpoint, block_tokens, *, pod = None, model = None, topic = None, replay_endpoint = None, data_parallel_rank = None, hashes = "int", locality = Some("LOCAL"), buffer_steps = 10_000, hwm = 100_000))]
    #[allow(clippy::too_many_arguments, reason = "the publisher's keyword arguments")]
    fn publish_events(
        &self,
        py: Python<'_>,
        endpoint: String,
        block_tokens: u32,
        pod: Option<String>,
        model: Option<String>,
        topic: Option<String>,
        replay_endpoint: Option<String>,
        data_parallel_rank: Option<i64>,
        hashes: &str,
        locality: Option<&str>,
        buffer_steps: usize,
        hwm: i32,
    ) -> PyResult<crate::kv_events::KvEventPublisher> {
        use kvferry_core::tier::kv_events::KvEventsConfig;
        let mut config = KvEventsConfig::new(endpoint, block_tokens);
        config.topic = match (pod, model, topic) {
            (Some(pod), Some(model), None) => kvferry_core::tier::kv_events::kv_topic(&pod, &model).or_raise()?,
            (None, None, topic) => topic.unwrap_or_default(),
            _ => return Err(PyValueError::new_err("give pod and model (topic kv@<pod>@<model>), or topic, not both")),
        };
        config.replay_endpoint = replay_endpoint;
        config.data_parallel_rank = data_parallel_rank;
        config.hash_form = hashes.parse().or_raise()?;
        config.locality = locality.map(str::parse).transpose().or_raise()?;
        config.buffer_steps = buffer_steps;
        config.hwm = hwm;
        let state = self.state()?;
        crate::kv_events::KvEventPublisher::start(py, &state.store, config)
    }

    /// What builds without the `kv-events` feature (the default wheel: libzmq is not part of the
    /// manylinux policy) answer, so that callers get a typed error rather than a missing method.
    #[cfg(not(feature = "kv-events"))]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn publish_events(&self, _args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        Err(Error::Unsupported {
            what: "publishing KV events".into(),
            why: "this build of kvferry has no kv-events feature (build the package with --features kv-events)".into(),
        })
        .or_raise()
    }

    /// Finish running operations, stop the workers, close the disk files; idempotent. The disk
    /// tier's blocks stay for the next store opened on the directory.
    fn close(&self, py: Python<'_>) {
        self.state.close(py);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, py: Python<'_>, _exc_info: &Bound<'_, PyTuple>) -> bool {
        self.state.close(py);
        false
    }

    fn __repr__(&self) -> String {
        self.state.peek(|state| match state {
            Some(state) => {
                let stats = state.store.stats();
                format!(
                    "TierStore(block_size={}, host_blocks={}/{}, disk_blocks={}/{})",
                    self.block_size,
                    stats.host_blocks,
                    stats.host_capacity_blocks,
                    stats.disk_blocks,
                    stats.disk_capacity_blocks
                )
            }
            None => format!("TierStore(block_size={}, closed)", self.block_size),
        })
    }
}

/// A put, get or offload in progress. It cannot be cancelled; dropping it lets it finish.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct StoreOp {
    fence: CopyFence,
}

#[pymethods]
impl StoreOp {
    /// True once done, False while running; raises the error it failed with.
    fn poll(&self) -> PyResult<bool> {
        match self.fence.poll() {
            None => Ok(false),
            Some(outcome) => outcome.map(|()| true).or_raise(),
        }
    }

    /// Wait for completion (without limit when `timeout` is None); raises the operation's error,
    /// or builtins.TimeoutError when `timeout` passes first (it goes on).
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let until = timeout.map(deadline).transpose()?;
        let outcome = py.detach(|| match until {
            Some(until) => self.fence.wait(until),
            // The store's workers bound each copy by their copy timeout, so this ends.
            None => loop {
                let outcome = self.fence.wait(Deadline::after(Duration::from_secs(1)));
                if self.fence.is_done() {
                    break outcome;
                }
            },
        });
        match outcome {
            Err(_) if !self.fence.is_done() => Err(PyTimeoutError::new_err(format!(
                "the store operation was still running after {} s",
                timeout.unwrap_or_default()
            ))),
            outcome => outcome.or_raise(),
        }
    }

    fn __repr__(&self) -> String {
        match self.fence.poll() {
            None => "StoreOp(running)".to_string(),
            Some(Ok(())) => "StoreOp(done)".to_string(),
            Some(Err(e)) => format!("StoreOp(failed: {e})"),
        }
    }
}

/// A change of place of some blocks.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct TierEvent {
    /// "stored", "removed", "moved" or "cleared".
    #[pyo3(get)]
    kind: &'static str,
    keys: Vec<BlockKey>,
    /// Where the blocks are now ("CPU", "DISK"), or where they left for "removed"; None for
    /// "cleared", which names no block.
    #[pyo3(get)]
    medium: Option<&'static str>,
    /// Where they came from, for "moved".
    #[pyo3(get)]
    from_medium: Option<&'static str>,
}

impl From<CoreTierEvent> for TierEvent {
    fn from(event: CoreTierEvent) -> Self {
        let (kind, keys, medium, from) = match event {
            CoreTierEvent::Stored { keys, medium } => ("stored", keys, Some(medium), None),
            CoreTierEvent::Removed { keys, medium } => ("removed", keys, Some(medium), None),
            CoreTierEvent::Moved { keys, from, to } => ("moved", keys, Some(to), Some(from)),
            CoreTierEvent::Cleared => ("cleared", Vec::new(), None, None),
        };
        TierEvent { kind, keys, medium: medium.map(Medium::as_str), from_medium: from.map(Medium::as_str) }
    }
}

#[pymethods]
impl TierEvent {
    #[getter]
    fn keys<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.keys.iter().map(|k| PyBytes::new(py, k.as_bytes())).collect()
    }

    fn __repr__(&self) -> String {
        let from = self.from_medium.map(|m| format!(", from_medium={m:?}")).unwrap_or_default();
        let medium = self.medium.map(|m| format!(", medium={m:?}")).unwrap_or_default();
        format!("TierEvent(kind={:?}, keys=<{}>{medium}{from})", self.kind, self.keys.len())
    }
}

/// kvferry's name of each medium ("GPU", "CPU", "DISK", as events and lookups spell them) to the
/// `medium` of vLLM's KV events ([`Medium::kv_event_name`]), for the vLLM connector's events.
pub fn kv_event_medium(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let media = PyDict::new(py);
    for medium in Medium::ALL {
        media.set_item(medium.as_str(), medium.kv_event_name())?;
    }
    Ok(media)
}

/// The chained keys of every full block of `tokens`.
#[pyfunction]
#[pyo3(signature = (tokens, block_tokens, extra = None))]
pub fn prefix_keys<'py>(
    py: Python<'py>,
    tokens: Vec<u32>,
    block_tokens: usize,
    extra: Option<PyBackedBytes>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    if block_tokens == 0 {
        return Err(PyValueError::new_err("block_tokens must be positive"));
    }
    let keys = BlockKey::prefix_keys(&tokens, block_tokens, extra.as_deref().unwrap_or_default());
    Ok(keys.iter().map(|k| PyBytes::new(py, k.as_bytes())).collect())
}

/// The key of the block holding `tokens` after the block keyed `parent` (None for the first).
#[pyfunction]
#[pyo3(signature = (parent, tokens, extra = None))]
pub fn chain_key<'py>(
    py: Python<'py>,
    parent: Option<PyBackedBytes>,
    tokens: Vec<u32>,
    extra: Option<PyBackedBytes>,
) -> PyResult<Bound<'py, PyBytes>> {
    let parent = parent.map(|p| block_key(&p)).transpose()?;
    let key = BlockKey::chain(parent.as_ref(), &tokens, extra.as_deref().unwrap_or_default());
    Ok(PyBytes::new(py, key.as_bytes()))
}

/// An engine's own block hash as a key: bytes verbatim (1 to 32), an int as 8 bytes big-endian.
#[pyfunction]
pub fn engine_key<'py>(py: Python<'py>, hash: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let bytes: Vec<u8> = match hash.extract::<PyBackedBytes>() {
        Ok(bytes) => bytes.to_vec(),
        // Python's builtin hash() is a signed 64-bit value; vLLM's are unsigned: take both.
        Err(_) => match (hash.extract::<u64>(), hash.extract::<i64>()) {
            (Ok(unsigned), _) => unsigned.to_be_bytes().to_vec(),
            (_, Ok(signed)) => signed.to_be_bytes().to_vec(),
            _ if hash.is_instance_of::<pyo3::types::PyInt>() => {
                return Err(exception(py, ErrorCode::TierBadKey, "an integer block hash must fit in 64 bits"));
            }
            _ => return Err(pyo3::exceptions::PyTypeError::new_err("a block hash is bytes or an int")),
        },
    };
    Ok(PyBytes::new(py, block_key(&bytes)?.as_bytes()))
}
