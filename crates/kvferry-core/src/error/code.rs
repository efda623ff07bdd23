//! The stable numeric error codes: a leaf that every module's error maps onto.

/// Declares [`ErrorCode`] with its list of every code and each code's documentation, so that the
/// front ends (the C header's constants, Python's `ERROR_CODES`) are generated from this one list.
macro_rules! error_codes {
    ($(#[$attr:meta])* pub enum ErrorCode { $($(#[doc = $doc:literal])* $name:ident = $value:literal,)* }) => {
        $(#[$attr])*
        pub enum ErrorCode {
            $($(#[doc = $doc])* $name = $value,)*
        }

        impl ErrorCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The variant's name (`PeerDisconnected`), for logs and metric labels.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => stringify!($name),)*
                }
            }

            /// The code's documentation, one line of its doc comment per item (each with the
            /// space after `///`); empty when it has none.
            pub fn doc_lines(self) -> &'static [&'static str] {
                match self {
                    $(ErrorCode::$name => &[$($doc),*],)*
                }
            }
        }
    };
}

error_codes! {
    /// Stable numeric error codes. Grouped by hundreds: general, memory, layout, metadata, descriptors,
    /// transfers, tier store, discovery.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(u32)]
    #[non_exhaustive]
    pub enum ErrorCode {
        InvalidArgument = 1,
        Unsupported = 2,
        Io = 3,

        AllocFailed = 100,
        HugePagesUnavailable = 101,
        PinFailed = 102,
        InvalidCopy = 103,
        NoDevice = 104,
        /// No driver for the device kind (the library loads it at run time).
        NoDriver = 105,
        DeviceCallFailed = 106,
        InvalidIpcHandle = 107,

        LayoutInvalid = 200,
        BlockOutOfRange = 201,
        LayoutIncompatible = 202,
        LayoutOverflow = 203,

        MetadataTruncated = 300,
        MetadataBadMagic = 301,
        MetadataVersion = 302,
        MetadataCorrupt = 303,
        MetadataMalformed = 304,

        NotRegistered = 400,
        RemoteRegionUnknown = 401,
        ZeroLength = 402,
        RangeOverflow = 403,
        LengthMismatch = 404,
        UnknownPeer = 405,
        DescIndexOutOfRange = 406,
        StaleDescriptors = 407,
        EmptyTransfer = 408,
        /// No single link to the peer reaches every descriptor of the request; split it.
        NoCommonLink = 409,

        Timeout = 500,
        Cancelled = 501,
        PeerUnreachable = 502,
        PeerDisconnected = 503,
        Protocol = 504,
        /// The peer did not prove the cluster secret, or refused this agent's proof.
        Unauthenticated = 505,
        /// The peer refused the request for one of its limits (a full notification queue, too many
        /// connections); it may succeed later.
        PeerBusy = 506,
        RemoteUnknownKey = 510,
        RemoteOutOfRange = 511,
        RemoteZeroLength = 512,
        RemoteRangeOverflow = 513,
        RemoteTooLarge = 514,

        /// The target's provider refused a remote access (unknown key or range outside a registration).
        FabricRemoteAccess = 520,
        /// A fabric provider failed a transfer for another reason.
        FabricTransfer = 521,
        /// No usable libfabric provider (or not the one asked for).
        FabricNoProvider = 522,
        /// A libfabric call failed while setting up (domain, endpoint, registration, address vector).
        FabricCall = 523,
        /// The peer uses another fabric provider.
        FabricProviderMismatch = 524,

        ShmCrossMemoryRefused = 540,
        ShmMappingFailed = 541,

        StagingFailed = 560,
        DeviceCopyFailed = 561,

        TierBadKey = 600,
        TierConfig = 601,
        TierBadBlock = 602,
        TierDiskUnavailable = 603,
        TierDiskFull = 604,
        TierIndexCorrupt = 605,
        TierIndexMismatch = 606,
        TierBlockCorrupt = 607,
        TierNotCached = 608,
        TierNoRoom = 609,
        TierDiskIo = 610,
        TierClosed = 611,
        /// Another store holds the disk tier's directory.
        TierDiskLocked = 612,
        /// The remote tier could not be reached or did not answer by the deadline.
        TierRemoteUnavailable = 613,
        /// An object of the remote tier failed its checksum or framing; it was dropped, never served.
        TierRemoteCorrupt = 614,
        /// An object of the remote tier belongs to another namespace or block; it was dropped.
        TierRemoteMismatch = 615,

        /// No etcd endpoint answered.
        DiscoveryUnreachable = 700,
        /// etcd answered with an error or something that is not its v3 JSON API.
        DiscoveryBadResponse = 701,
        /// etcd let this agent's lease expire.
        DiscoveryLeaseLost = 702,
        /// No agent of that name is registered under the prefix.
        DiscoveryPeerNotFound = 703,
        /// An endpoint or prefix that cannot be used.
        DiscoveryConfig = 704,
    }
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}
