"""kvferry: KV-cache block transfer between engines and tiering to pinned DRAM and disk.

``Agent`` moves registered memory (torch tensors, numpy arrays, raw pointers) to and from peers
over shared memory, libfabric or TCP; ``TierStore`` keeps blocks in pinned DRAM, on disk and in a
remote tier every engine shares (S3-compatible object storage or a shared directory), found again
by prefix keys; ``RemoteTier`` looks blocks up in that remote tier alone. Every call that waits releases the GIL. Failures raise ``KvferryError``
subclasses carrying kvferry's stable error code.
"""

from ._errors import (
    DescriptorError,
    InvalidArgumentError,
    KvferryError,
    LayoutError,
    MetadataError,
    RegistrationError,
    TierError,
    TransferError,
    TransferTimeoutError,
    UnsupportedError,
)
from ._kvferry import (
    ERROR_CODES,
    KV_EVENT_MEDIUM,
    TRANSFER_DURATION_BUCKETS,
    Agent,
    Prepared,
    Registration,
    RemoteTier,
    StoreOp,
    TierEvent,
    TierStore,
    Transfer,
    __version__,
    authenticate_socket,
    chain_key,
    engine_key,
    prefix_keys,
)

__all__ = [
    "ERROR_CODES",
    "KV_EVENT_MEDIUM",
    "Agent",
    "DescriptorError",
    "InvalidArgumentError",
    "KvferryError",
    "LayoutError",
    "MetadataError",
    "Prepared",
    "Registration",
    "RegistrationError",
    "RemoteTier",
    "StoreOp",
    "TierError",
    "TierEvent",
    "TierStore",
    "TRANSFER_DURATION_BUCKETS",
    "Transfer",
    "TransferError",
    "TransferTimeoutError",
    "UnsupportedError",
    "__version__",
    "authenticate_socket",
    "chain_key",
    "engine_key",
    "prefix_keys",
]
