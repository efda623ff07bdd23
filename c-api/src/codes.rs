//! kvferry's error codes as C constants, generated from `kvferry_core::ErrorCode` by
//! `tests/header.rs`; do not edit. Regenerate with
//! `KVFERRY_REGENERATE_HEADER=1 cargo test -p kvferry-c --test header`.

use kvferry_core::ErrorCode;

use crate::status::kvferry_status;

pub const KVFERRY_ERR_INVALID_ARGUMENT: kvferry_status = 1;
pub const KVFERRY_ERR_UNSUPPORTED: kvferry_status = 2;
pub const KVFERRY_ERR_IO: kvferry_status = 3;

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

/// The target's provider refused a remote access (unknown key or range outside a registration).
pub const KVFERRY_ERR_FABRIC_REMOTE_ACCESS: kvferry_status = 520;

/// A fabric provider failed a transfer for another reason.
pub const KVFERRY_ERR_FABRIC_TRANSFER: kvferry_status = 521;

/// No usable libfabric provider (or not the one asked for).
pub const KVFERRY_ERR_FABRIC_NO_PROVIDER: kvferry_status = 522;

/// A libfabric call failed while setting up (domain, endpoint, registration, address vector).
pub const KVFERRY_ERR_FABRIC_CALL: kvferry_status = 523;

/// The peer uses another fabric provider.
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

/// Another store holds the disk tier's directory.
pub const KVFERRY_ERR_TIER_DISK_LOCKED: kvferry_status = 612;

/// The remote tier could not be reached or did not answer by the deadline.
pub const KVFERRY_ERR_TIER_REMOTE_UNAVAILABLE: kvferry_status = 613;

/// An object of the remote tier failed its checksum or framing; it was dropped, never served.
pub const KVFERRY_ERR_TIER_REMOTE_CORRUPT: kvferry_status = 614;

/// An object of the remote tier belongs to another namespace or block; it was dropped.
pub const KVFERRY_ERR_TIER_REMOTE_MISMATCH: kvferry_status = 615;

/// No etcd endpoint answered.
pub const KVFERRY_ERR_DISCOVERY_UNREACHABLE: kvferry_status = 700;

/// etcd answered with an error or something that is not its v3 JSON API.
pub const KVFERRY_ERR_DISCOVERY_BAD_RESPONSE: kvferry_status = 701;

/// etcd let this agent's lease expire.
pub const KVFERRY_ERR_DISCOVERY_LEASE_LOST: kvferry_status = 702;

/// No agent of that name is registered under the prefix.
pub const KVFERRY_ERR_DISCOVERY_PEER_NOT_FOUND: kvferry_status = 703;

/// An endpoint or prefix that cannot be used.
pub const KVFERRY_ERR_DISCOVERY_CONFIG: kvferry_status = 704;

/// The name of a library code, as `kvferry_status_name` returns it.
pub(crate) fn name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidArgument => "KVFERRY_ERR_INVALID_ARGUMENT\0",
        ErrorCode::Unsupported => "KVFERRY_ERR_UNSUPPORTED\0",
        ErrorCode::Io => "KVFERRY_ERR_IO\0",
        ErrorCode::AllocFailed => "KVFERRY_ERR_ALLOC_FAILED\0",
        ErrorCode::HugePagesUnavailable => "KVFERRY_ERR_HUGE_PAGES_UNAVAILABLE\0",
        ErrorCode::PinFailed => "KVFERRY_ERR_PIN_FAILED\0",
        ErrorCode::InvalidCopy => "KVFERRY_ERR_INVALID_COPY\0",
        ErrorCode::NoDevice => "KVFERRY_ERR_NO_DEVICE\0",
        ErrorCode::NoDriver => "KVFERRY_ERR_NO_DRIVER\0",
        ErrorCode::DeviceCallFailed => "KVFERRY_ERR_DEVICE_CALL_FAILED\0",
        ErrorCode::InvalidIpcHandle => "KVFERRY_ERR_INVALID_IPC_HANDLE\0",
        ErrorCode::LayoutInvalid => "KVFERRY_ERR_LAYOUT_INVALID\0",
        ErrorCode::BlockOutOfRange => "KVFERRY_ERR_BLOCK_OUT_OF_RANGE\0",
        ErrorCode::LayoutIncompatible => "KVFERRY_ERR_LAYOUT_INCOMPATIBLE\0",
        ErrorCode::LayoutOverflow => "KVFERRY_ERR_LAYOUT_OVERFLOW\0",
        ErrorCode::MetadataTruncated => "KVFERRY_ERR_METADATA_TRUNCATED\0",
        ErrorCode::MetadataBadMagic => "KVFERRY_ERR_METADATA_BAD_MAGIC\0",
        ErrorCode::MetadataVersion => "KVFERRY_ERR_METADATA_VERSION\0",
        ErrorCode::MetadataCorrupt => "KVFERRY_ERR_METADATA_CORRUPT\0",
        ErrorCode::MetadataMalformed => "KVFERRY_ERR_METADATA_MALFORMED\0",
        ErrorCode::NotRegistered => "KVFERRY_ERR_NOT_REGISTERED\0",
        ErrorCode::RemoteRegionUnknown => "KVFERRY_ERR_REMOTE_REGION_UNKNOWN\0",
        ErrorCode::ZeroLength => "KVFERRY_ERR_ZERO_LENGTH\0",
        ErrorCode::RangeOverflow => "KVFERRY_ERR_RANGE_OVERFLOW\0",
        ErrorCode::LengthMismatch => "KVFERRY_ERR_LENGTH_MISMATCH\0",
        ErrorCode::UnknownPeer => "KVFERRY_ERR_UNKNOWN_PEER\0",
        ErrorCode::DescIndexOutOfRange => "KVFERRY_ERR_DESC_INDEX_OUT_OF_RANGE\0",
        ErrorCode::StaleDescriptors => "KVFERRY_ERR_STALE_DESCRIPTORS\0",
        ErrorCode::EmptyTransfer => "KVFERRY_ERR_EMPTY_TRANSFER\0",
        ErrorCode::NoCommonLink => "KVFERRY_ERR_NO_COMMON_LINK\0",
        ErrorCode::Timeout => "KVFERRY_ERR_TIMEOUT\0",
        ErrorCode::Cancelled => "KVFERRY_ERR_CANCELLED\0",
        ErrorCode::PeerUnreachable => "KVFERRY_ERR_PEER_UNREACHABLE\0",
        ErrorCode::PeerDisconnected => "KVFERRY_ERR_PEER_DISCONNECTED\0",
        ErrorCode::Protocol => "KVFERRY_ERR_PROTOCOL\0",
        ErrorCode::Unauthenticated => "KVFERRY_ERR_UNAUTHENTICATED\0",
        ErrorCode::PeerBusy => "KVFERRY_ERR_PEER_BUSY\0",
        ErrorCode::RemoteUnknownKey => "KVFERRY_ERR_REMOTE_UNKNOWN_KEY\0",
        ErrorCode::RemoteOutOfRange => "KVFERRY_ERR_REMOTE_OUT_OF_RANGE\0",
        ErrorCode::RemoteZeroLength => "KVFERRY_ERR_REMOTE_ZERO_LENGTH\0",
        ErrorCode::RemoteRangeOverflow => "KVFERRY_ERR_REMOTE_RANGE_OVERFLOW\0",
        ErrorCode::RemoteTooLarge => "KVFERRY_ERR_REMOTE_TOO_LARGE\0",
        ErrorCode::FabricRemoteAccess => "KVFERRY_ERR_FABRIC_REMOTE_ACCESS\0",
        ErrorCode::FabricTransfer => "KVFERRY_ERR_FABRIC_TRANSFER\0",
        ErrorCode::FabricNoProvider => "KVFERRY_ERR_FABRIC_NO_PROVIDER\0",
        ErrorCode::FabricCall => "KVFERRY_ERR_FABRIC_CALL\0",
        ErrorCode::FabricProviderMismatch => "KVFERRY_ERR_FABRIC_PROVIDER_MISMATCH\0",
        ErrorCode::ShmCrossMemoryRefused => "KVFERRY_ERR_SHM_CROSS_MEMORY_REFUSED\0",
        ErrorCode::ShmMappingFailed => "KVFERRY_ERR_SHM_MAPPING_FAILED\0",
        ErrorCode::StagingFailed => "KVFERRY_ERR_STAGING_FAILED\0",
        ErrorCode::DeviceCopyFailed => "KVFERRY_ERR_DEVICE_COPY_FAILED\0",
        ErrorCode::TierBadKey => "KVFERRY_ERR_TIER_BAD_KEY\0",
        ErrorCode::TierConfig => "KVFERRY_ERR_TIER_CONFIG\0",
        ErrorCode::TierBadBlock => "KVFERRY_ERR_TIER_BAD_BLOCK\0",
        ErrorCode::TierDiskUnavailable => "KVFERRY_ERR_TIER_DISK_UNAVAILABLE\0",
        ErrorCode::TierDiskFull => "KVFERRY_ERR_TIER_DISK_FULL\0",
        ErrorCode::TierIndexCorrupt => "KVFERRY_ERR_TIER_INDEX_CORRUPT\0",
        ErrorCode::TierIndexMismatch => "KVFERRY_ERR_TIER_INDEX_MISMATCH\0",
        ErrorCode::TierBlockCorrupt => "KVFERRY_ERR_TIER_BLOCK_CORRUPT\0",
        ErrorCode::TierNotCached => "KVFERRY_ERR_TIER_NOT_CACHED\0",
        ErrorCode::TierNoRoom => "KVFERRY_ERR_TIER_NO_ROOM\0",
        ErrorCode::TierDiskIo => "KVFERRY_ERR_TIER_DISK_IO\0",
        ErrorCode::TierClosed => "KVFERRY_ERR_TIER_CLOSED\0",
        ErrorCode::TierDiskLocked => "KVFERRY_ERR_TIER_DISK_LOCKED\0",
        ErrorCode::TierRemoteUnavailable => "KVFERRY_ERR_TIER_REMOTE_UNAVAILABLE\0",
        ErrorCode::TierRemoteCorrupt => "KVFERRY_ERR_TIER_REMOTE_CORRUPT\0",
        ErrorCode::TierRemoteMismatch => "KVFERRY_ERR_TIER_REMOTE_MISMATCH\0",
        ErrorCode::DiscoveryUnreachable => "KVFERRY_ERR_DISCOVERY_UNREACHABLE\0",
        ErrorCode::DiscoveryBadResponse => "KVFERRY_ERR_DISCOVERY_BAD_RESPONSE\0",
        ErrorCode::DiscoveryLeaseLost => "KVFERRY_ERR_DISCOVERY_LEASE_LOST\0",
        ErrorCode::DiscoveryPeerNotFound => "KVFERRY_ERR_DISCOVERY_PEER_NOT_FOUND\0",
        ErrorCode::DiscoveryConfig => "KVFERRY_ERR_DISCOVERY_CONFIG\0",
        _ => "KVFERRY_ERR_UNKNOWN\0",
    }
}
