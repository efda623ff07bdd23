//! The remote tier's settings as Python passes them (a dict), its counters as a dict, and
//! `RemoteTier`: a client of the remote level alone, for a process that looks blocks up without
//! holding them (the vLLM connector's scheduler).

use std::time::Duration;

use kvferry_core::tier::{RemoteConfig, RemoteLocation, RemoteLookup, RemoteStats, RemoteTier as CoreRemoteTier};
use kvferry_core::{BlockKey, Error};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use crate::errors::OrRaise;

/// The keys of a remote settings dict, in the order the docs list them.
const KEYS: [&str; 9] = [
    "url",
    "path",
    "namespace",
    "timeout",
    "concurrency",
    "max_upload_bytes",
    "failures_to_open",
    "retry_after",
    "options",
];

/// `{"url": "s3://bucket/prefix"}` or `{"path": "/shared/kv"}`, with `"namespace"` and optional
/// `timeout` / `retry_after` (seconds), `concurrency`, `max_upload_bytes`, `failures_to_open`, and
/// `options` (object_store settings such as `aws_endpoint`).
pub(crate) fn remote_config(settings: &Bound<'_, PyDict>) -> PyResult<RemoteConfig> {
    for key in settings.keys() {
        let key: String = key.extract()?;
        if !KEYS.contains(&key.as_str()) {
            return Err(PyValueError::new_err(format!("unknown remote tier setting {key:?}; known: {KEYS:?}")));
        }
    }
    let get = |key: &str| settings.get_item(key);
    let location = match (get("url")?, get("path")?) {
        (Some(url), None) => RemoteLocation::Url(url.extract()?),
        (None, Some(path)) => RemoteLocation::Path(path.extract()?),
        _ => return Err(PyValueError::new_err("the remote tier takes either \"url\" or \"path\"")),
    };
    let namespace: String = match get("namespace")? {
        Some(namespace) => namespace.extract()?,
        None => return Err(PyValueError::new_err("the remote tier needs a \"namespace\"")),
    };
    let mut config = RemoteConfig::new(location, namespace);
    let seconds = |value: Bound<'_, PyAny>, key: &str| -> PyResult<Duration> {
        let secs: f64 = value.extract()?;
        Duration::try_from_secs_f64(secs)
            .map_err(|_| PyValueError::new_err(format!("\"{key}\" must be a finite number of seconds >= 0")))
    };
    if let Some(v) = get("timeout")? {
        config.timeout = seconds(v, "timeout")?;
    }
    if let Some(v) = get("retry_after")? {
        config.retry_after = seconds(v, "retry_after")?;
    }
    if let Some(v) = get("concurrency")? {
        config.concurrency = v.extract()?;
    }
    if let Some(v) = get("max_upload_bytes")? {
        config.max_upload_bytes = v.extract()?;
    }
    if let Some(v) = get("failures_to_open")? {
        config.failures_to_open = v.extract()?;
    }
    if let Some(v) = get("options")? {
        let options = v.cast_into::<PyDict>().map_err(|_| PyValueError::new_err("\"options\" must be a dict"))?;
        for (key, value) in options.iter() {
            config.options.push((key.extract()?, value.extract()?));
        }
    }
    Ok(config)
}

pub(crate) fn stats_dict<'py>(py: Python<'py>, stats: &RemoteStats) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, count) in stats.counts() {
        dict.set_item(name, count)?;
    }
    dict.set_item("breaker_open", stats.breaker_open)?;
    dict.set_item("last_error", stats.last_error.as_deref())?;
    Ok(dict)
}

fn keys_of(keys: &[PyBackedBytes]) -> PyResult<Vec<BlockKey>> {
    keys.iter()
        .map(|k| BlockKey::from_engine_hash(k).map_err(Error::from))
        .collect::<kvferry_core::Result<_>>()
        .or_raise()
}

/// A client of the remote level alone: looks blocks up without holding any.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct RemoteTier {
    tier: CoreRemoteTier,
}

#[pymethods]
impl RemoteTier {
    #[new]
    fn new(block_size: usize, remote: &Bound<'_, PyDict>) -> PyResult<Self> {
        let config = remote_config(remote)?;
        let tier = CoreRemoteTier::open(config, block_size).map_err(Error::from).or_raise()?;
        Ok(RemoteTier { tier })
    }

    /// How many leading `keys` the remote holds, or None while it is being asked (ask again);
    /// never waits on the network.
    fn lookup(&self, keys: Vec<PyBackedBytes>) -> PyResult<Option<usize>> {
        let keys = keys_of(&keys)?;
        Ok(match self.tier.lookup(&keys) {
            RemoteLookup::Found(n) => Some(n),
            RemoteLookup::Pending => None,
        })
    }

    /// Count `keys` as absent for a while (their load failed): lookups stop at them.
    fn forget(&self, keys: Vec<PyBackedBytes>) -> PyResult<()> {
        let keys = keys_of(&keys)?;
        self.tier.forget(&keys);
        Ok(())
    }

    /// The objects' fingerprint (hex): the folder under the prefix holding this namespace.
    #[getter]
    fn fingerprint(&self) -> String {
        self.tier.fingerprint()
    }

    #[getter]
    fn location(&self) -> &str {
        self.tier.location()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.tier.stats())
    }

    fn __repr__(&self) -> String {
        format!("RemoteTier(location={:?}, fingerprint={})", self.tier.location(), self.tier.fingerprint())
    }
}
