//! `Registration`: registered memory, what keeps it in place, and the checks that revoke it when
//! a tensor's memory moved.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvferry_core::{ErrorCode, MemRegion, Registration as CoreRegistration};
use pyo3::prelude::*;

use crate::convert::device_name;
use crate::errors::exception;

/// What keeps registered memory where it is.
pub(crate) enum Keep {
    /// A `kvferry._memory.TensorKeep`: the tensor's storage, pinned where torch allows; its
    /// `moved()` tells whether the memory is still the tensor's.
    Tensor(Py<PyAny>),
    /// The object and a memoryview of it: the export stops a numpy array or a bytearray from
    /// being resized (its memory moved) while registered.
    Buffer(#[allow(dead_code, reason = "held, never read: its references are what keeps the buffer")] Py<PyAny>),
}

impl Keep {
    /// Give up what the registration held; only once no transport can reach the memory.
    pub(crate) fn release(self, py: Python<'_>) {
        if let Keep::Tensor(keep) = &self
            && let Err(e) = keep.call_method0(py, "release")
        {
            // Nothing is left to undo for the caller: the memory then stays with the private
            // storage, freed when it goes.
            e.write_unraisable(py, Some(keep.bind(py)));
        }
    }
}

/// One registration as the agent, the Python object and prepared lists share it.
pub(crate) struct Held {
    pub(crate) region: MemRegion,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    registration: Option<CoreRegistration>,
    /// `None` for `register_ptr` memory, which the caller keeps valid.
    keep: Option<Keep>,
    /// Why the registration was revoked by a check; every later use raises it.
    revoked: Option<String>,
}

impl Held {
    pub(crate) fn new(region: MemRegion, registration: CoreRegistration, keep: Option<Keep>) -> Arc<Held> {
        Arc::new(Held { region, state: Mutex::new(State { registration: Some(registration), keep, revoked: None }) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_live(&self) -> bool {
        self.state().registration.is_some()
    }

    fn revoked_error(&self, py: Python<'_>, why: &str) -> PyErr {
        let region = self.region;
        let message =
            format!("the registration of {:#x}+{} ({}) was revoked: {why}", region.addr, region.len, region.kind);
        exception(py, ErrorCode::NotRegistered, &message)
    }

    /// Raise if the registration was revoked, or revoke it now (and raise) if a tensor's memory
    /// moved. A deregistered registration passes: using it fails in the agent with NotRegistered.
    pub(crate) fn check(&self, py: Python<'_>) -> PyResult<()> {
        let keep = {
            let state = self.state();
            if let Some(why) = &state.revoked {
                return Err(self.revoked_error(py, why));
            }
            match &state.keep {
                Some(Keep::Tensor(keep)) if state.registration.is_some() => keep.clone_ref(py),
                _ => return Ok(()),
            }
        };
        // Without the lock: `moved()` is Python code, and may let other threads run.
        let moved: Option<String> = keep.call_method0(py, "moved")?.extract(py)?;
        match moved {
            None => Ok(()),
            Some(why) => {
                self.end(py, Some(why.clone()));
                Err(self.revoked_error(py, &why))
            }
        }
    }

    /// Deregister from every transport (without the GIL: the drop waits for local transfers still
    /// using the memory), then release what kept the memory. `why` marks a revocation.
    pub(crate) fn end(&self, py: Python<'_>, why: Option<String>) {
        let (registration, keep) = {
            let mut state = self.state();
            if why.is_some() && state.registration.is_some() {
                state.revoked = why;
            }
            (state.registration.take(), state.keep.take())
        };
        py.detach(move || drop(registration));
        if let Some(keep) = keep {
            keep.release(py);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let state = std::mem::take(self.state.get_mut().unwrap_or_else(PoisonError::into_inner));
        if state.registration.is_none() && state.keep.is_none() {
            return;
        }
        // Garbage collection runs this with the GIL held: deregistration must not keep it while
        // it waits, or every Python thread stops meanwhile.
        let mut state = Some(state);
        let ended = Python::try_attach(|py| {
            let State { registration, keep, .. } = state.take().expect("taken once");
            py.detach(move || drop(registration));
            if let Some(keep) = keep {
                keep.release(py);
            }
        });
        if ended.is_none() {
            // The interpreter is shutting down: no other Python thread runs any more. What Python
            // objects `state` holds are released by PyO3 later, if ever.
            drop(state);
        }
    }
}

/// Memory registered with an agent; `deregister()` (or garbage collection) ends it.
#[pyclass(frozen, weakref, module = "kvferry._kvferry")]
pub struct Registration {
    pub(crate) held: Arc<Held>,
}

#[pymethods]
impl Registration {
    #[getter]
    fn addr(&self) -> u64 {
        self.held.region.addr
    }

    #[getter]
    fn length(&self) -> u64 {
        self.held.region.len
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.held.region.kind)
    }

    /// Peers lose access; returns once no local transfer touches the memory. Idempotent.
    fn deregister(&self, py: Python<'_>) {
        self.held.end(py, None);
    }

    /// Raise NotRegistered (revoking the registration) if a registered tensor's memory is no
    /// longer the tensor's; kvferry also checks on every use and periodically.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        self.held.check(py)
    }

    fn __repr__(&self) -> String {
        let state = self.held.state();
        let status = match (&state.revoked, state.registration.is_some()) {
            (Some(_), _) => ", revoked",
            (None, true) => "",
            (None, false) => ", deregistered",
        };
        let region = self.held.region;
        format!(
            "Registration(addr={:#x}, length={}, device={:?}{status})",
            region.addr,
            region.len,
            device_name(region.kind)
        )
    }
}
