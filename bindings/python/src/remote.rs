//! The remote tier's settings as Python passes them (a dict), its counters as a dict, and
//! `RemoteTier`: a client of the remote level alone, for a process that looks blocks up without
//! holding them (the vLLM connector's scheduler).

use kvferry_core::tier::{RemoteConfig, RemoteLookup, RemoteStats, RemoteTier as CoreRemoteTier};
use kvferry_core::{BlockKey, Error};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use crate::errors::OrRaise;

/// `{"url": "s3://bucket/prefix"}` or `{"path": "/shared/kv"}`, with `"namespace"` and optional
/// `timeout` / `retry_after` (seconds), `concurrency`, `max_upload_bytes`, `failures_to_open`, and
/// `options` (object_store settings such as `aws_endpoint`), as the remote tier's options every
/// front end gives ([`RemoteConfig::from_options`], keys without their `remote.` prefix): seconds
/// become `timeout_ms` and `retry_after_ms`, each entry of `options` an `option.NAME`.
pub(crate) fn remote_options(settings: &Bound<'_, PyDict>) -> PyResult<Vec<(String, String)>> {
    let mut options = Vec::new();
    for (key, value) in settings.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "timeout" | "retry_after" => {
                let secs: f64 = value.extract()?;
                if !(secs.is_finite() && (0.0..=1e9).contains(&secs)) {
                    return Err(PyValueError::new_err(format!("\"{key}\" must be a finite number of seconds >= 0")));
                }
                options.push((format!("{key}_ms"), ((secs * 1000.0).round() as u64).to_string()));
            }
            "options" => {
                let client =
                    value.cast_into::<PyDict>().map_err(|_| PyValueError::new_err("\"options\" must be a dict"))?;
                for (name, setting) in client.iter() {
                    options.push((format!("option.{}", name.extract::<String>()?), setting.extract()?));
                }
            }
            _ => options.push((key, value.str()?.to_string())),
        }
    }
    Ok(options)
}

/// The remote tier's configuration from a settings dict (see [`remote_options`]).
pub(crate) fn remote_config(settings: &Bound<'_, PyDict>) -> PyResult<RemoteConfig> {
    let options = remote_options(settings)?;
    RemoteConfig::from_options(options.iter().map(|(k, v)| (k.as_str(), v.as_str()))).or_raise()
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
