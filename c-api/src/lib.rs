//! kvferry's C ABI (`libkvferry.so`, `libkvferry.a`, `include/kvferry.h`).
//!
//! Every entry point returns a status code, keeps its failure's message for
//! `kvferry_last_error_message`, and stops panics at the boundary. Objects are named by handles:
//! ids into a table ([`handles`]), so invalid and destroyed handles are errors, not crashes.

// The item names are the C names: the header is generated from them.
#![allow(non_camel_case_types)]
// Each function's pointer contract is in its doc comment, which is what C callers read.
#![allow(clippy::missing_safety_doc)]

// Declared first: the header lists the status codes before the functions that return them.
mod status;
// Generated from kvferry's `ErrorCode` by tests/header.rs; public, as the constants are for C.
pub mod codes;

mod agent;
mod args;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handles;
mod memory;
mod peer;
mod store;
mod transfer;

use std::ffi::c_char;

/// The ABI this header describes. Compare with `kvferry_abi_version()` at startup: a library with
/// another value is not compatible with code compiled against this header.
pub const KVFERRY_ABI_VERSION: u32 = 1;

/// The library's version, `"MAJOR.MINOR.PATCH"`.
///
/// Ownership: a static string; never free it.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version of the loaded library (`KVFERRY_ABI_VERSION` of the header it was built with).
///
/// Ownership: nothing to own; never fails.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_abi_version() -> u32 {
    KVFERRY_ABI_VERSION
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    #[test]
    fn versions_agree_with_the_package_and_the_soname() {
        let version = unsafe { CStr::from_ptr(kvferry_version()) }.to_str().unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert_eq!(kvferry_abi_version(), KVFERRY_ABI_VERSION);
        assert_eq!(env!("KVFERRY_SONAME"), format!("libkvferry.so.{KVFERRY_ABI_VERSION}"));
    }
}
