//! kvferry errors as Python exceptions: the class follows the code's range (`kvferry._errors`).

use kvferry_core::{Error, ErrorCode};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The exception for `code`, built by `kvferry._errors.error_for` so that the class hierarchy lives
/// in Python, where users read it.
pub(crate) fn exception(py: Python<'_>, code: ErrorCode, message: &str) -> PyErr {
    let built = py
        .import("kvferry._errors")
        .and_then(|errors| errors.getattr("error_for")?.call1((code.as_u32(), code.name(), message)));
    match built {
        Ok(exception) => PyErr::from_value(exception),
        Err(import_failed) => import_failed,
    }
}

/// Every error code by name, for `kvferry.ERROR_CODES`.
pub(crate) fn codes(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let codes = PyDict::new(py);
    for &code in ErrorCode::ALL {
        codes.set_item(code.name(), code.as_u32())?;
    }
    Ok(codes)
}

/// Results of kvferry calls, raised as the matching exception.
pub(crate) trait OrRaise<T> {
    fn or_raise(self) -> PyResult<T>;
}

impl<T> OrRaise<T> for Result<T, Error> {
    fn or_raise(self) -> PyResult<T> {
        self.map_err(|e| Python::attach(|py| exception(py, e.code(), &e.to_string())))
    }
}
