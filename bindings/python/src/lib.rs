//! `kvferry._kvferry`: the extension module behind the Python package `kvferry`.
//!
//! Every call that can wait (network, disk, another thread) releases the GIL; kvferry errors become
//! the exceptions of `kvferry._errors`, which carry the stable error code.

mod agent;
mod auth;
mod cli;
mod closable;
mod convert;
mod errors;
#[cfg(feature = "kv-events")]
mod kv_events;
mod registration;
mod remote;
mod store;

use pyo3::prelude::*;

#[pymodule]
fn _kvferry(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ERROR_CODES", errors::codes(m.py())?)?;
    m.add("CLI_PYTHON_ENV", kvferry_cli::cli::PYTHON_LAUNCHER_ENV)?;
    // The upper bounds (seconds) of the buckets of `Agent.stats()`'s "duration_buckets".
    m.add("TRANSFER_DURATION_BUCKETS", kvferry_core::metrics::LATENCY_BUCKETS.to_vec())?;
    m.add_class::<agent::Agent>()?;
    m.add_class::<registration::Registration>()?;
    m.add_class::<agent::Prepared>()?;
    m.add_class::<agent::Transfer>()?;
    m.add_class::<store::TierStore>()?;
    m.add_class::<store::StoreOp>()?;
    m.add_class::<store::TierEvent>()?;
    m.add_class::<remote::RemoteTier>()?;
    #[cfg(feature = "kv-events")]
    m.add_class::<kv_events::KvEventPublisher>()?;
    m.add("KV_EVENT_MEDIUM", store::kv_event_medium(m.py())?)?;
    m.add_function(wrap_pyfunction!(auth::authenticate_socket, m)?)?;
    m.add_function(wrap_pyfunction!(cli::cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(store::prefix_keys, m)?)?;
    m.add_function(wrap_pyfunction!(store::chain_key, m)?)?;
    m.add_function(wrap_pyfunction!(store::engine_key, m)?)?;
    Ok(())
}
