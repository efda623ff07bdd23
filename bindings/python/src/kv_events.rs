//! `KvEventPublisher`: a tier store's events over ZMQ in vLLM's KV event format (feature
//! `kv-events`, which links libzmq and so is not in the default wheel).

use std::sync::{Mutex, PoisonError};

use kvferry_core::TierStore;
use kvferry_core::tier::kv_events::{KvEventPublisher as CorePublisher, KvEventsConfig};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::errors::OrRaise;

/// Publishes a store's events until closed; the store does not wait for it (slow subscribers
/// lose messages at the high-water mark instead).
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct KvEventPublisher {
    /// As ZMQ resolved them (the port a `tcp://*:0` bind picked).
    #[pyo3(get)]
    endpoint: String,
    #[pyo3(get)]
    replay_endpoint: Option<String>,
    #[pyo3(get)]
    topic: String,
    publisher: Mutex<Option<CorePublisher>>,
}

impl KvEventPublisher {
    pub(crate) fn start(py: Python<'_>, store: &TierStore, config: KvEventsConfig) -> PyResult<Self> {
        let topic = config.topic.clone();
        let publisher = py.detach(|| CorePublisher::start(store, config)).or_raise()?;
        Ok(KvEventPublisher {
            endpoint: publisher.endpoint().to_string(),
            replay_endpoint: publisher.replay_endpoint().map(str::to_string),
            topic,
            publisher: Mutex::new(Some(publisher)),
        })
    }
}

#[pymethods]
impl KvEventPublisher {
    /// Stop publishing (what was sent stays sent); idempotent.
    fn close(&self, py: Python<'_>) {
        let publisher = self.publisher.lock().unwrap_or_else(PoisonError::into_inner).take();
        // Its thread is joined, which takes up to one poll interval.
        py.detach(move || drop(publisher));
    }

    #[getter]
    fn closed(&self) -> bool {
        self.publisher.lock().unwrap_or_else(PoisonError::into_inner).is_none()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, py: Python<'_>, _exc_info: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { ", closed" } else { "" };
        format!("KvEventPublisher(endpoint={:?}, topic={:?}{state})", self.endpoint, self.topic)
    }
}
