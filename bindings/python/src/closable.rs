//! What `Agent` and `TierStore` share: a handle that `close()` empties while other threads may
//! still hold the Python object.

use std::sync::{PoisonError, RwLock};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

pub(crate) struct Closable<T: Send> {
    what: &'static str,
    /// `None` once closed.
    inner: RwLock<Option<T>>,
}

impl<T: Clone + Send> Closable<T> {
    pub(crate) fn new(what: &'static str, inner: T) -> Self {
        Closable { what, inner: RwLock::new(Some(inner)) }
    }

    /// A clone to work with outside the lock (blocking calls run without it, and without the GIL).
    pub(crate) fn get(&self) -> PyResult<T> {
        self.peek(|inner| inner.cloned()).ok_or_else(|| PyValueError::new_err(format!("the {} is closed", self.what)))
    }

    pub(crate) fn peek<R>(&self, look: impl FnOnce(Option<&T>) -> R) -> R {
        look(self.inner.read().unwrap_or_else(PoisonError::into_inner).as_ref())
    }

    /// Drop this handle without the GIL (dropping the last one joins threads); idempotent. Calls
    /// still running on a clone finish first.
    pub(crate) fn close(&self, py: Python<'_>) {
        let inner = self.inner.write().unwrap_or_else(PoisonError::into_inner).take();
        py.detach(move || drop(inner));
    }
}

impl<T: Send> Drop for Closable<T> {
    /// Garbage collection runs this with the GIL held: like `close()`, drop without it.
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        if inner.is_some() {
            let mut inner = Some(inner);
            // Shutting down (no attach possible): no other Python thread is left to stall.
            Python::try_attach(|py| {
                let inner = inner.take();
                py.detach(move || drop(inner));
            });
        }
    }
}
