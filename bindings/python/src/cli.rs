//! The `kvferry` command line, run by the package's console script (`kvferry._cli`).

use pyo3::prelude::*;

/// Run the `kvferry` command with `argv` (the program's name first) and return its exit status;
/// the GIL is released while it runs.
#[pyfunction]
pub fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| kvferry_cli::cli::run(argv))
}
