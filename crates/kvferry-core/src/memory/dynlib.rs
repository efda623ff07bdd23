//! Loading a vendor's driver library at run time, so that a build with GPU support still starts
//! (and reports "no driver") on a machine without it.

use std::ffi::{CStr, CString, c_void};

/// A shared library opened with `dlopen`. Never closed: the driver stays loaded for the process,
/// as its runtime expects, and symbols taken from it stay valid.
#[derive(Debug)]
pub(crate) struct DynLib {
    handle: *mut c_void,
}

// SAFETY: a dlopen handle is process-wide and usable from any thread.
unsafe impl Send for DynLib {}
unsafe impl Sync for DynLib {}

impl DynLib {
    /// Opens the first of `names` the dynamic linker finds; the error lists what was tried and why
    /// the last attempt failed.
    pub fn open(names: &[&'static str]) -> Result<DynLib, String> {
        let mut last_error = String::new();
        for &name in names {
            let c_name = CString::new(name).map_err(|_| format!("library name {name:?} has a NUL byte"))?;
            // SAFETY: a valid C string; RTLD_NOW reports missing dependencies here, not at first call.
            let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if !handle.is_null() {
                return Ok(DynLib { handle });
            }
            last_error = dl_error();
        }
        Err(format!("none of {} could be loaded ({last_error})", names.join(", ")))
    }

    /// The address of `symbol`, or `None` when the library does not export it (an older driver).
    pub fn symbol(&self, symbol: &CStr) -> Option<*mut c_void> {
        // SAFETY: `handle` is a live dlopen handle and `symbol` a valid C string.
        let ptr = unsafe { libc::dlsym(self.handle, symbol.as_ptr()) };
        (!ptr.is_null()).then_some(ptr)
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        return "unknown dlopen error".into();
    }
    // SAFETY: checked non-null above.
    unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_libc_and_finds_its_symbols() {
        let lib = DynLib::open(&["libc.so.6"]).unwrap();
        assert!(lib.symbol(c"memcpy").is_some());
        assert!(lib.symbol(c"kvferry_no_such_symbol").is_none());
    }

    #[test]
    fn a_missing_library_is_an_error_naming_what_was_tried() {
        let err = DynLib::open(&["libkvferry-absent.so.1", "libkvferry-absent.so"]).unwrap_err();
        assert!(err.contains("libkvferry-absent.so.1") && err.contains("libkvferry-absent.so"), "{err}");
    }
}
