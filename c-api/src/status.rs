//! Status codes, the thread-local last error, and the guard every entry point runs in.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kvferry_core::{Error, ErrorCode};

/// What every fallible function returns: `KVFERRY_OK` (0) or an error code. Codes are stable: they
/// are kvferry's own error codes (1xx memory, 2xx layout, 3xx metadata, 4xx descriptors, 5xx
/// transfers, 6xx the tier store) plus 4 to 9 for misuse of the C interface. A code this header does not list may
/// appear from a newer library; `kvferry_status_name` names the ones it knows.
pub type kvferry_status = i32;

pub const KVFERRY_OK: kvferry_status = 0;

pub const KVFERRY_ERR_INVALID_ARGUMENT: kvferry_status = 1;
pub const KVFERRY_ERR_UNSUPPORTED: kvferry_status = 2;
pub const KVFERRY_ERR_IO: kvferry_status = 3;
/// A pointer argument that must not be NULL was NULL.
pub const KVFERRY_ERR_NULL_POINTER: kvferry_status = 4;
/// A handle that was never created, was destroyed already (double destroy included), belongs to
/// a destroyed agent, or is of another kind.
pub const KVFERRY_ERR_INVALID_HANDLE: kvferry_status = 5;
/// kvferry hit an internal bug; the call had no effect beyond what the message says.
pub const KVFERRY_ERR_PANIC: kvferry_status = 6;
/// An output buffer is too small; the required size was written and nothing was consumed.
pub const KVFERRY_ERR_BUFFER_TOO_SMALL: kvferry_status = 7;

pub const KVFERRY_ERR_ALLOC_FAILED: kvferry_status = 100;
pub const KVFERRY_ERR_HUGE_PAGES_UNAVAILABLE: kvferry_status = 101;
pub const KVFERRY_ERR_PIN_FAILED: kvferry_status = 102;
pub const KVFERRY_ERR_INVALID_COPY: kvferry_status = 103;
pub const KVFERRY_ERR_NO_DEVICE: kvferry_status = 104;
/// No driver for the device kind (the library loads it at run time).
pub const KVFERRY_ERR_NO_DRIVER: kvferry_status = 105;
pub const KVFERRY_ERR_DEVICE_CALL_FAILED: kvferry_status = 106;
pub const KVFERRY_ERR_INVALID_IPC_HANDLE: kvferry_status = 107;

pub const KVFERRY_ERR_LAYOUT_INVALID: kvferry_status = 200;
pub const KVFERRY_ERR_BLOCK_OUT_OF_RANGE: kvferry_status = 201;
pub const KVFERRY_ERR_LAYOUT_INCOMPATIBLE: kvferry_status = 202;
pub const KVFERRY_ERR_LAYOUT_OVERFLOW: kvferry_status = 203;

pub const KVFERRY_ERR_METADATA_TRUNCATED: kvferry_status = 300;
pub const KVFERRY_ERR_METADATA_BAD_MAGIC: kvferry_status = 301;
pub const KVFERRY_ERR_METADATA_VERSION: kvferry_status = 302;
pub const KVFERRY_ERR_METADATA_CORRUPT: kvferry_status = 303;
pub const KVFERRY_ERR_METADATA_MALFORMED: kvferry_status = 304;

pub const KVFERRY_ERR_NOT_REGISTERED: kvferry_status = 400;
pub const KVFERRY_ERR_REMOTE_REGION_UNKNOWN: kvferry_status = 401;
pub const KVFERRY_ERR_ZERO_LENGTH: kvferry_status = 402;
pub const KVFERRY_ERR_RANGE_OVERFLOW: kvferry_status = 403;
pub const KVFERRY_ERR_LENGTH_MISMATCH: kvferry_status = 404;
pub const KVFERRY_ERR_UNKNOWN_PEER: kvferry_status = 405;
pub const KVFERRY_ERR_DESC_INDEX_OUT_OF_RANGE: kvferry_status = 406;
pub const KVFERRY_ERR_STALE_DESCRIPTORS: kvferry_status = 407;
pub const KVFERRY_ERR_EMPTY_TRANSFER: kvferry_status = 408;
/// No single link to the peer reaches every descriptor of the request; split it.
pub const KVFERRY_ERR_NO_COMMON_LINK: kvferry_status = 409;

pub const KVFERRY_ERR_TIMEOUT: kvferry_status = 500;
pub const KVFERRY_ERR_CANCELLED: kvferry_status = 501;
pub const KVFERRY_ERR_PEER_UNREACHABLE: kvferry_status = 502;
pub const KVFERRY_ERR_PEER_DISCONNECTED: kvferry_status = 503;
pub const KVFERRY_ERR_PROTOCOL: kvferry_status = 504;
/// The peer did not prove the cluster secret, or refused this agent's proof.
pub const KVFERRY_ERR_UNAUTHENTICATED: kvferry_status = 505;
/// The peer refused the request for one of its limits (a full notification queue, too many
/// connections); it may succeed later.
pub const KVFERRY_ERR_PEER_BUSY: kvferry_status = 506;
pub const KVFERRY_ERR_REMOTE_UNKNOWN_KEY: kvferry_status = 510;
pub const KVFERRY_ERR_REMOTE_OUT_OF_RANGE: kvferry_status = 511;
pub const KVFERRY_ERR_REMOTE_ZERO_LENGTH: kvferry_status = 512;
pub const KVFERRY_ERR_REMOTE_RANGE_OVERFLOW: kvferry_status = 513;
pub const KVFERRY_ERR_REMOTE_TOO_LARGE: kvferry_status = 514;
pub const KVFERRY_ERR_FABRIC_REMOTE_ACCESS: kvferry_status = 520;
pub const KVFERRY_ERR_FABRIC_TRANSFER: kvferry_status = 521;
pub const KVFERRY_ERR_FABRIC_NO_PROVIDER: kvferry_status = 522;
pub const KVFERRY_ERR_FABRIC_CALL: kvferry_status = 523;
pub const KVFERRY_ERR_FABRIC_PROVIDER_MISMATCH: kvferry_status = 524;
pub const KVFERRY_ERR_SHM_CROSS_MEMORY_REFUSED: kvferry_status = 540;
pub const KVFERRY_ERR_SHM_MAPPING_FAILED: kvferry_status = 541;
pub const KVFERRY_ERR_STAGING_FAILED: kvferry_status = 560;
pub const KVFERRY_ERR_DEVICE_COPY_FAILED: kvferry_status = 561;

pub const KVFERRY_ERR_TIER_BAD_KEY: kvferry_status = 600;
pub const KVFERRY_ERR_TIER_CONFIG: kvferry_status = 601;
pub const KVFERRY_ERR_TIER_BAD_BLOCK: kvferry_status = 602;
pub const KVFERRY_ERR_TIER_DISK_UNAVAILABLE: kvferry_status = 603;
pub const KVFERRY_ERR_TIER_DISK_FULL: kvferry_status = 604;
pub const KVFERRY_ERR_TIER_INDEX_CORRUPT: kvferry_status = 605;
pub const KVFERRY_ERR_TIER_INDEX_MISMATCH: kvferry_status = 606;
pub const KVFERRY_ERR_TIER_BLOCK_CORRUPT: kvferry_status = 607;
pub const KVFERRY_ERR_TIER_NOT_CACHED: kvferry_status = 608;
pub const KVFERRY_ERR_TIER_NO_ROOM: kvferry_status = 609;
pub const KVFERRY_ERR_TIER_DISK_IO: kvferry_status = 610;
pub const KVFERRY_ERR_TIER_CLOSED: kvferry_status = 611;
pub const KVFERRY_ERR_TIER_DISK_LOCKED: kvferry_status = 612;
/// The remote tier could not be reached or did not answer by the deadline.
pub const KVFERRY_ERR_TIER_REMOTE_UNAVAILABLE: kvferry_status = 613;
/// An object of the remote tier failed its checksum or framing; it was dropped, never served.
pub const KVFERRY_ERR_TIER_REMOTE_CORRUPT: kvferry_status = 614;
/// An object of the remote tier belongs to another namespace or block; it was dropped.
pub const KVFERRY_ERR_TIER_REMOTE_MISMATCH: kvferry_status = 615;
pub const KVFERRY_ERR_DISCOVERY_UNREACHABLE: kvferry_status = 700;
pub const KVFERRY_ERR_DISCOVERY_BAD_RESPONSE: kvferry_status = 701;
pub const KVFERRY_ERR_DISCOVERY_LEASE_LOST: kvferry_status = 702;
pub const KVFERRY_ERR_DISCOVERY_PEER_NOT_FOUND: kvferry_status = 703;
pub const KVFERRY_ERR_DISCOVERY_CONFIG: kvferry_status = 704;

/// Every code the header lists, with its name and, for kvferry's own codes, the `ErrorCode` it
/// must equal (checked by a test, so the header cannot drift from the library).
const CODES: &[(kvferry_status, &str, Option<ErrorCode>)] = &[
    (KVFERRY_OK, "KVFERRY_OK\0", None),
    (KVFERRY_ERR_INVALID_ARGUMENT, "KVFERRY_ERR_INVALID_ARGUMENT\0", Some(ErrorCode::InvalidArgument)),
    (KVFERRY_ERR_UNSUPPORTED, "KVFERRY_ERR_UNSUPPORTED\0", Some(ErrorCode::Unsupported)),
    (KVFERRY_ERR_IO, "KVFERRY_ERR_IO\0", Some(ErrorCode::Io)),
    (KVFERRY_ERR_NULL_POINTER, "KVFERRY_ERR_NULL_POINTER\0", None),
    (KVFERRY_ERR_INVALID_HANDLE, "KVFERRY_ERR_INVALID_HANDLE\0", None),
    (KVFERRY_ERR_PANIC, "KVFERRY_ERR_PANIC\0", None),
    (KVFERRY_ERR_BUFFER_TOO_SMALL, "KVFERRY_ERR_BUFFER_TOO_SMALL\0", None),
    (KVFERRY_ERR_ALLOC_FAILED, "KVFERRY_ERR_ALLOC_FAILED\0", Some(ErrorCode::AllocFailed)),
    (KVFERRY_ERR_HUGE_PAGES_UNAVAILABLE, "KVFERRY_ERR_HUGE_PAGES_UNAVAILABLE\0", Some(ErrorCode::HugePagesUnavailable)),
    (KVFERRY_ERR_PIN_FAILED, "KVFERRY_ERR_PIN_FAILED\0", Some(ErrorCode::PinFailed)),
    (KVFERRY_ERR_INVALID_COPY, "KVFERRY_ERR_INVALID_COPY\0", Some(ErrorCode::InvalidCopy)),
    (KVFERRY_ERR_NO_DEVICE, "KVFERRY_ERR_NO_DEVICE\0", Some(ErrorCode::NoDevice)),
    (KVFERRY_ERR_NO_DRIVER, "KVFERRY_ERR_NO_DRIVER\0", Some(ErrorCode::NoDriver)),
    (KVFERRY_ERR_DEVICE_CALL_FAILED, "KVFERRY_ERR_DEVICE_CALL_FAILED\0", Some(ErrorCode::DeviceCallFailed)),
    (KVFERRY_ERR_INVALID_IPC_HANDLE, "KVFERRY_ERR_INVALID_IPC_HANDLE\0", Some(ErrorCode::InvalidIpcHandle)),
    (KVFERRY_ERR_LAYOUT_INVALID, "KVFERRY_ERR_LAYOUT_INVALID\0", Some(ErrorCode::LayoutInvalid)),
    (KVFERRY_ERR_BLOCK_OUT_OF_RANGE, "KVFERRY_ERR_BLOCK_OUT_OF_RANGE\0", Some(ErrorCode::BlockOutOfRange)),
    (KVFERRY_ERR_LAYOUT_INCOMPATIBLE, "KVFERRY_ERR_LAYOUT_INCOMPATIBLE\0", Some(ErrorCode::LayoutIncompatible)),
    (KVFERRY_ERR_LAYOUT_OVERFLOW, "KVFERRY_ERR_LAYOUT_OVERFLOW\0", Some(ErrorCode::LayoutOverflow)),
    (KVFERRY_ERR_METADATA_TRUNCATED, "KVFERRY_ERR_METADATA_TRUNCATED\0", Some(ErrorCode::MetadataTruncated)),
    (KVFERRY_ERR_METADATA_BAD_MAGIC, "KVFERRY_ERR_METADATA_BAD_MAGIC\0", Some(ErrorCode::MetadataBadMagic)),
    (KVFERRY_ERR_METADATA_VERSION, "KVFERRY_ERR_METADATA_VERSION\0", Some(ErrorCode::MetadataVersion)),
    (KVFERRY_ERR_METADATA_CORRUPT, "KVFERRY_ERR_METADATA_CORRUPT\0", Some(ErrorCode::MetadataCorrupt)),
    (KVFERRY_ERR_METADATA_MALFORMED, "KVFERRY_ERR_METADATA_MALFORMED\0", Some(ErrorCode::MetadataMalformed)),
    (KVFERRY_ERR_NOT_REGISTERED, "KVFERRY_ERR_NOT_REGISTERED\0", Some(ErrorCode::NotRegistered)),
    (KVFERRY_ERR_REMOTE_REGION_UNKNOWN, "KVFERRY_ERR_REMOTE_REGION_UNKNOWN\0", Some(ErrorCode::RemoteRegionUnknown)),
    (KVFERRY_ERR_ZERO_LENGTH, "KVFERRY_ERR_ZERO_LENGTH\0", Some(ErrorCode::ZeroLength)),
    (KVFERRY_ERR_RANGE_OVERFLOW, "KVFERRY_ERR_RANGE_OVERFLOW\0", Some(ErrorCode::RangeOverflow)),
    (KVFERRY_ERR_LENGTH_MISMATCH, "KVFERRY_ERR_LENGTH_MISMATCH\0", Some(ErrorCode::LengthMismatch)),
    (KVFERRY_ERR_UNKNOWN_PEER, "KVFERRY_ERR_UNKNOWN_PEER\0", Some(ErrorCode::UnknownPeer)),
    (
        KVFERRY_ERR_DESC_INDEX_OUT_OF_RANGE,
        "KVFERRY_ERR_DESC_INDEX_OUT_OF_RANGE\0",
        Some(ErrorCode::DescIndexOutOfRange),
    ),
    (KVFERRY_ERR_STALE_DESCRIPTORS, "KVFERRY_ERR_STALE_DESCRIPTORS\0", Some(ErrorCode::StaleDescriptors)),
    (KVFERRY_ERR_EMPTY_TRANSFER, "KVFERRY_ERR_EMPTY_TRANSFER\0", Some(ErrorCode::EmptyTransfer)),
    (KVFERRY_ERR_NO_COMMON_LINK, "KVFERRY_ERR_NO_COMMON_LINK\0", Some(ErrorCode::NoCommonLink)),
    (KVFERRY_ERR_TIMEOUT, "KVFERRY_ERR_TIMEOUT\0", Some(ErrorCode::Timeout)),
    (KVFERRY_ERR_CANCELLED, "KVFERRY_ERR_CANCELLED\0", Some(ErrorCode::Cancelled)),
    (KVFERRY_ERR_PEER_UNREACHABLE, "KVFERRY_ERR_PEER_UNREACHABLE\0", Some(ErrorCode::PeerUnreachable)),
    (KVFERRY_ERR_PEER_DISCONNECTED, "KVFERRY_ERR_PEER_DISCONNECTED\0", Some(ErrorCode::PeerDisconnected)),
    (KVFERRY_ERR_PROTOCOL, "KVFERRY_ERR_PROTOCOL\0", Some(ErrorCode::Protocol)),
    (KVFERRY_ERR_UNAUTHENTICATED, "KVFERRY_ERR_UNAUTHENTICATED\0", Some(ErrorCode::Unauthenticated)),
    (KVFERRY_ERR_PEER_BUSY, "KVFERRY_ERR_PEER_BUSY\0", Some(ErrorCode::PeerBusy)),
    (KVFERRY_ERR_REMOTE_UNKNOWN_KEY, "KVFERRY_ERR_REMOTE_UNKNOWN_KEY\0", Some(ErrorCode::RemoteUnknownKey)),
    (KVFERRY_ERR_REMOTE_OUT_OF_RANGE, "KVFERRY_ERR_REMOTE_OUT_OF_RANGE\0", Some(ErrorCode::RemoteOutOfRange)),
    (KVFERRY_ERR_REMOTE_ZERO_LENGTH, "KVFERRY_ERR_REMOTE_ZERO_LENGTH\0", Some(ErrorCode::RemoteZeroLength)),
    (KVFERRY_ERR_REMOTE_RANGE_OVERFLOW, "KVFERRY_ERR_REMOTE_RANGE_OVERFLOW\0", Some(ErrorCode::RemoteRangeOverflow)),
    (KVFERRY_ERR_REMOTE_TOO_LARGE, "KVFERRY_ERR_REMOTE_TOO_LARGE\0", Some(ErrorCode::RemoteTooLarge)),
    (KVFERRY_ERR_FABRIC_REMOTE_ACCESS, "KVFERRY_ERR_FABRIC_REMOTE_ACCESS\0", Some(ErrorCode::FabricRemoteAccess)),
    (KVFERRY_ERR_FABRIC_TRANSFER, "KVFERRY_ERR_FABRIC_TRANSFER\0", Some(ErrorCode::FabricTransfer)),
    (KVFERRY_ERR_FABRIC_NO_PROVIDER, "KVFERRY_ERR_FABRIC_NO_PROVIDER\0", Some(ErrorCode::FabricNoProvider)),
    (KVFERRY_ERR_FABRIC_CALL, "KVFERRY_ERR_FABRIC_CALL\0", Some(ErrorCode::FabricCall)),
    (
        KVFERRY_ERR_FABRIC_PROVIDER_MISMATCH,
        "KVFERRY_ERR_FABRIC_PROVIDER_MISMATCH\0",
        Some(ErrorCode::FabricProviderMismatch),
    ),
    (
        KVFERRY_ERR_SHM_CROSS_MEMORY_REFUSED,
        "KVFERRY_ERR_SHM_CROSS_MEMORY_REFUSED\0",
        Some(ErrorCode::ShmCrossMemoryRefused),
    ),
    (KVFERRY_ERR_SHM_MAPPING_FAILED, "KVFERRY_ERR_SHM_MAPPING_FAILED\0", Some(ErrorCode::ShmMappingFailed)),
    (KVFERRY_ERR_STAGING_FAILED, "KVFERRY_ERR_STAGING_FAILED\0", Some(ErrorCode::StagingFailed)),
    (KVFERRY_ERR_DEVICE_COPY_FAILED, "KVFERRY_ERR_DEVICE_COPY_FAILED\0", Some(ErrorCode::DeviceCopyFailed)),
    (KVFERRY_ERR_TIER_BAD_KEY, "KVFERRY_ERR_TIER_BAD_KEY\0", Some(ErrorCode::TierBadKey)),
    (KVFERRY_ERR_TIER_CONFIG, "KVFERRY_ERR_TIER_CONFIG\0", Some(ErrorCode::TierConfig)),
    (KVFERRY_ERR_TIER_BAD_BLOCK, "KVFERRY_ERR_TIER_BAD_BLOCK\0", Some(ErrorCode::TierBadBlock)),
    (KVFERRY_ERR_TIER_DISK_UNAVAILABLE, "KVFERRY_ERR_TIER_DISK_UNAVAILABLE\0", Some(ErrorCode::TierDiskUnavailable)),
    (KVFERRY_ERR_TIER_DISK_FULL, "KVFERRY_ERR_TIER_DISK_FULL\0", Some(ErrorCode::TierDiskFull)),
    (KVFERRY_ERR_TIER_INDEX_CORRUPT, "KVFERRY_ERR_TIER_INDEX_CORRUPT\0", Some(ErrorCode::TierIndexCorrupt)),
    (KVFERRY_ERR_TIER_INDEX_MISMATCH, "KVFERRY_ERR_TIER_INDEX_MISMATCH\0", Some(ErrorCode::TierIndexMismatch)),
    (KVFERRY_ERR_TIER_BLOCK_CORRUPT, "KVFERRY_ERR_TIER_BLOCK_CORRUPT\0", Some(ErrorCode::TierBlockCorrupt)),
    (KVFERRY_ERR_TIER_NOT_CACHED, "KVFERRY_ERR_TIER_NOT_CACHED\0", Some(ErrorCode::TierNotCached)),
    (KVFERRY_ERR_TIER_NO_ROOM, "KVFERRY_ERR_TIER_NO_ROOM\0", Some(ErrorCode::TierNoRoom)),
    (KVFERRY_ERR_TIER_DISK_IO, "KVFERRY_ERR_TIER_DISK_IO\0", Some(ErrorCode::TierDiskIo)),
    (KVFERRY_ERR_TIER_CLOSED, "KVFERRY_ERR_TIER_CLOSED\0", Some(ErrorCode::TierClosed)),
    (KVFERRY_ERR_TIER_DISK_LOCKED, "KVFERRY_ERR_TIER_DISK_LOCKED\0", Some(ErrorCode::TierDiskLocked)),
    (
        KVFERRY_ERR_TIER_REMOTE_UNAVAILABLE,
        "KVFERRY_ERR_TIER_REMOTE_UNAVAILABLE\0",
        Some(ErrorCode::TierRemoteUnavailable),
    ),
    (KVFERRY_ERR_TIER_REMOTE_CORRUPT, "KVFERRY_ERR_TIER_REMOTE_CORRUPT\0", Some(ErrorCode::TierRemoteCorrupt)),
    (KVFERRY_ERR_TIER_REMOTE_MISMATCH, "KVFERRY_ERR_TIER_REMOTE_MISMATCH\0", Some(ErrorCode::TierRemoteMismatch)),
    (KVFERRY_ERR_DISCOVERY_UNREACHABLE, "KVFERRY_ERR_DISCOVERY_UNREACHABLE\0", Some(ErrorCode::DiscoveryUnreachable)),
    (KVFERRY_ERR_DISCOVERY_BAD_RESPONSE, "KVFERRY_ERR_DISCOVERY_BAD_RESPONSE\0", Some(ErrorCode::DiscoveryBadResponse)),
    (KVFERRY_ERR_DISCOVERY_LEASE_LOST, "KVFERRY_ERR_DISCOVERY_LEASE_LOST\0", Some(ErrorCode::DiscoveryLeaseLost)),
    (
        KVFERRY_ERR_DISCOVERY_PEER_NOT_FOUND,
        "KVFERRY_ERR_DISCOVERY_PEER_NOT_FOUND\0",
        Some(ErrorCode::DiscoveryPeerNotFound),
    ),
    (KVFERRY_ERR_DISCOVERY_CONFIG, "KVFERRY_ERR_DISCOVERY_CONFIG\0", Some(ErrorCode::DiscoveryConfig)),
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
    CODES.iter().find(|(code, ..)| *code == status).map_or("KVFERRY_ERR_UNKNOWN\0", |(_, name, _)| name).as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    #[test]
    fn header_codes_equal_the_library_codes() {
        for (code, name, core) in CODES {
            if let Some(core) = core {
                assert_eq!(*code as u32, core.as_u32(), "{name}");
            }
            assert!(name.ends_with('\0') && !name[..name.len() - 1].contains('\0'), "{name}");
            let shown = unsafe { CStr::from_ptr(kvferry_status_name(*code)) };
            assert_eq!(shown.to_bytes(), &name.as_bytes()[..name.len() - 1]);
        }
        for code in ErrorCode::ALL {
            assert!(CODES.iter().any(|(_, _, core)| *core == Some(*code)), "{code:?} has no constant in the header");
        }
        let unknown = unsafe { CStr::from_ptr(kvferry_status_name(-17)) };
        assert_eq!(unknown.to_str().unwrap(), "KVFERRY_ERR_UNKNOWN");
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
