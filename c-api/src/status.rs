//! Status codes, the thread-local last error, and the guard every entry point runs in.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kvferry_core::{Error, ErrorCode};

use crate::codes::{self, KVFERRY_ERR_INVALID_ARGUMENT};

/// What every fallible function returns: `KVFERRY_OK` (0) or an error code. Codes are stable: they
/// are kvferry's own error codes (1xx memory, 2xx layout, 3xx metadata, 4xx descriptors, 5xx
/// transfers, 6xx the tier store) plus 4 to 9 for misuse of the C interface. A code this header does not list may
/// appear from a newer library; `kvferry_status_name` names the ones it knows.
pub type kvferry_status = i32;

pub const KVFERRY_OK: kvferry_status = 0;

/// A pointer argument that must not be NULL was NULL.
pub const KVFERRY_ERR_NULL_POINTER: kvferry_status = 4;
/// A handle that was never created, was destroyed already (double destroy included), belongs to
/// a destroyed agent, or is of another kind.
pub const KVFERRY_ERR_INVALID_HANDLE: kvferry_status = 5;
/// kvferry hit an internal bug; the call had no effect beyond what the message says.
pub const KVFERRY_ERR_PANIC: kvferry_status = 6;
/// An output buffer is too small; the required size was written and nothing was consumed.
pub const KVFERRY_ERR_BUFFER_TOO_SMALL: kvferry_status = 7;

/// The codes of the C interface itself, which kvferry's `ErrorCode` leaves free (4 to 9); the
/// library's own codes are generated into `codes.rs`.
const INTERFACE_CODES: &[(kvferry_status, &str)] = &[
    (KVFERRY_OK, "KVFERRY_OK\0"),
    (KVFERRY_ERR_NULL_POINTER, "KVFERRY_ERR_NULL_POINTER\0"),
    (KVFERRY_ERR_INVALID_HANDLE, "KVFERRY_ERR_INVALID_HANDLE\0"),
    (KVFERRY_ERR_PANIC, "KVFERRY_ERR_PANIC\0"),
    (KVFERRY_ERR_BUFFER_TOO_SMALL, "KVFERRY_ERR_BUFFER_TOO_SMALL\0"),
];

/// Why a call failed: the code it returns and the message `kvferry_last_error_message` gives.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: kvferry_status,
    pub message: String,
}

impl Failure {
    pub fn new(code: kvferry_status, message: impl Into<String>) -> Self {
        Failure { code, message: message.into() }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Failure::new(KVFERRY_ERR_INVALID_ARGUMENT, message)
    }

    pub fn null(argument: &str) -> Self {
        Failure::new(KVFERRY_ERR_NULL_POINTER, format!("{argument} is NULL"))
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(e.code().as_u32() as kvferry_status, e.to_string())
    }
}

pub(crate) type CResult<T = ()> = Result<T, Failure>;

thread_local! {
    /// The last message with its NUL, or empty for "". Reused across calls, so a successful call
    /// allocates nothing.
    static LAST_ERROR: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn set_last_error(message: &str) {
    // Unavailable only while the thread is being torn down; the code still reaches the caller.
    let _ = LAST_ERROR.try_with(|slot| {
        let mut slot = slot.borrow_mut();
        slot.clear();
        if !message.is_empty() {
            // A NUL inside the text would cut the C string short; nothing else needs escaping.
            slot.extend(message.bytes().filter(|&b| b != 0));
            slot.push(0);
        }
    });
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// Run one entry point: its outcome becomes a status code and the thread's last error message, and
/// a panic stops here instead of unwinding into C.
pub(crate) fn guard(call: impl FnOnce() -> CResult) -> kvferry_status {
    let outcome = catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|payload| {
        Err(Failure::new(KVFERRY_ERR_PANIC, format!("internal error in kvferry: {}", panic_text(payload.as_ref()))))
    });
    match outcome {
        Ok(()) => {
            set_last_error("");
            KVFERRY_OK
        }
        Err(failure) => {
            set_last_error(&failure.message);
            failure.code
        }
    }
}

/// The message of the last call on this thread that failed, or "" when the last call succeeded.
///
/// Ownership: the string belongs to kvferry and stays valid until the next kvferry call on the
/// same thread; copy it to keep it. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_last_error_message() -> *const c_char {
    const EMPTY: &[u8] = b"\0";
    // The pointer stays valid after `with` returns: the buffer lives in the thread-local slot and
    // is only changed by the next call on this thread.
    let message = LAST_ERROR.try_with(|slot| {
        let slot = slot.borrow();
        if slot.is_empty() { EMPTY.as_ptr() } else { slot.as_ptr() }
    });
    message.unwrap_or(EMPTY.as_ptr()).cast()
}

/// The name of a status code (`"KVFERRY_ERR_TIMEOUT"`), or `"KVFERRY_ERR_UNKNOWN"` for a code this
/// library does not know.
///
/// Ownership: a static string; never free it. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_status_name(status: kvferry_status) -> *const c_char {
    let library = u32::try_from(status).ok().and_then(|code| ErrorCode::ALL.iter().find(|c| c.as_u32() == code));
    let name = match library {
        Some(&code) => codes::name(code),
        None => INTERFACE_CODES.iter().find(|(code, _)| *code == status).map_or("KVFERRY_ERR_UNKNOWN\0", |(_, n)| n),
    };
    name.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    #[test]
    fn every_code_has_its_name_and_the_interface_codes_are_free_in_the_library() {
        let name = |code| unsafe { CStr::from_ptr(kvferry_status_name(code)) }.to_str().unwrap().to_string();
        for &code in ErrorCode::ALL {
            let shown = name(code.as_u32() as kvferry_status);
            assert!(shown.starts_with("KVFERRY_ERR_") && shown != "KVFERRY_ERR_UNKNOWN", "{code:?}: {shown}");
        }
        for (code, expected) in INTERFACE_CODES {
            assert!(ErrorCode::ALL.iter().all(|c| c.as_u32() as kvferry_status != *code), "{expected} is taken");
            assert_eq!(name(*code), expected.trim_end_matches('\0'));
        }
        assert_eq!(name(KVFERRY_ERR_INVALID_ARGUMENT), "KVFERRY_ERR_INVALID_ARGUMENT");
        assert_eq!(name(-17), "KVFERRY_ERR_UNKNOWN");
    }

    #[test]
    fn a_panic_becomes_a_code_and_a_message() {
        let status = guard(|| panic!("boom {}", 7));
        assert_eq!(status, KVFERRY_ERR_PANIC);
        let message = unsafe { CStr::from_ptr(kvferry_last_error_message()) }.to_str().unwrap();
        assert!(message.contains("boom 7"), "{message}");
        assert_eq!(guard(|| Ok(())), KVFERRY_OK);
        assert_eq!(unsafe { CStr::from_ptr(kvferry_last_error_message()) }.to_bytes(), b"");
    }

    #[test]
    fn the_last_error_is_per_thread_and_drops_embedded_nuls() {
        assert_eq!(guard(|| Err(Failure::invalid_argument("a\0b"))), KVFERRY_ERR_INVALID_ARGUMENT);
        std::thread::spawn(|| {
            assert_eq!(unsafe { CStr::from_ptr(kvferry_last_error_message()) }.to_bytes(), b"");
        })
        .join()
        .unwrap();
        assert_eq!(unsafe { CStr::from_ptr(kvferry_last_error_message()) }.to_str().unwrap(), "ab");
    }
}
