"""Type stubs of the extension module ``kvferry._kvferry`` (re-exported by ``kvferry``)."""

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, Literal, Optional, TypedDict, Union

from typing_extensions import Buffer, Self

__version__: str
#: Every kvferry error code by name (``ErrorCode`` in Rust).
ERROR_CODES: dict[str, int]
#: kvferry's medium names ("GPU", "CPU", "DISK") to the ``medium`` of vLLM's KV events ("GPU",
#: "CPU", "STORAGE"): the spelling the store's publisher and the vLLM connector share.
KV_EVENT_MEDIUM: dict[str, str]
#: The variable the console script sets to its interpreter (see ``kvferry._cli``).
CLI_PYTHON_ENV: str
#: Upper bounds, in seconds, of the buckets of ``Agent.stats()``'s ``duration_buckets`` (one more,
#: ``+Inf``, ends the list).
TRANSFER_DURATION_BUCKETS: list[float]

_Bytes = Union[bytes, bytearray, memoryview]
_Blocks = Sequence[tuple[_Bytes, Sequence[tuple[int, int]]]]

class _Closes:
    """``close()``, also on leaving a ``with`` block; closing twice is harmless."""

    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> Literal[False]: ...

class Agent(_Closes):
    """One engine rank's endpoint: registered memory, transports, peers, transfers."""

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tcp: bool = True,
        shm: bool = True,
        fabric_provider: Optional[str] = None,
        advertise_host: Optional[str] = None,
        cuda_device: Optional[int] = None,
        secret: Optional[Union[str, bytes]] = None,
        auth: Literal["env", "none"] = "env",
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_require_client_cert: bool = False,
        tls_server_name: Optional[str] = None,
        options: Optional[Mapping[str, Union[bool, int, str]]] = None,
    ) -> None:
        """``options``: any agent option by its key (``{"tcp.streams": 4, "max_peers": 64}``), the
        same keys as the C ABI's ``key=value`` options, listed with their defaults by
        ``kvferry info``; applied after the keyword arguments, which are options under other names."""
    @property
    def name(self) -> str: ...
    def metadata(self) -> bytes: ...
    def add_peer(self, metadata: _Bytes) -> str: ...
    def remove_peer(self, name: str) -> None: ...
    def peers(self) -> list[str]: ...
    def stats(self) -> list[dict[str, Any]]:
        """Transfer counters since the agent started, one dict per transport and direction used:
        ``transport``, ``direction`` ("read", "write", "notify"), ``transfers``, ``bytes``,
        ``failures``, ``in_flight``, ``duration_seconds`` (summed) and ``duration_buckets`` (settled
        transfers per bucket of ``TRANSFER_DURATION_BUCKETS``, not cumulative, ``+Inf`` last)."""
    def serve_side_channel(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]: ...
    def connect_peer(self, addr: str, timeout: float = 10.0) -> str: ...
    def register(self, obj: Union[Buffer, Any], *, device: Optional[str] = None) -> Registration: ...
    def register_ptr(self, addr: int, length: int, device: str = "cpu") -> Registration: ...
    def prepare_local(self, regions: Sequence[tuple[int, int]], *, device: Optional[str] = None) -> Prepared: ...
    def prepare_remote(
        self, peer: str, regions: Sequence[tuple[int, int]], *, device: Optional[str] = None
    ) -> Prepared: ...
    def read(
        self,
        local: Prepared,
        local_indices: Sequence[int],
        remote: Prepared,
        remote_indices: Sequence[int],
        *,
        notification: Optional[_Bytes] = None,
        timeout: float = 30.0,
    ) -> Transfer: ...
    # The same arguments; WRITE moves local -> remote.
    write = read
    def notify(self, peer: str, data: _Bytes, timeout: float = 30.0) -> Transfer: ...
    def take_notifications(self) -> list[tuple[str, bytes]]: ...
    def wait_notifications(self, timeout: float) -> list[tuple[str, bytes]]: ...
    def check(self) -> None:
        """Raise DescriptorError (NotRegistered) for a registered tensor whose memory moved, revoking it."""

class Registration:
    """Memory registered with an agent; ``deregister()`` (or garbage collection) ends it."""

    @property
    def addr(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def device(self) -> str: ...
    def deregister(self) -> None: ...
    def check(self) -> None:
        """Raise DescriptorError (NotRegistered), revoking the registration, if a tensor's memory moved."""

class Prepared:
    """Regions checked once; transfers pick entries by index."""

    def __len__(self) -> int: ...
    @property
    def peer(self) -> Optional[str]: ...

class Transfer:
    """A posted transfer or notification."""

    def poll(self) -> bool: ...
    def wait(self, timeout: Optional[float] = None) -> None: ...
    def cancel(self) -> None: ...
    @property
    def peer(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def ops(self) -> int: ...
    @property
    def transport(self) -> str: ...
    @property
    def elapsed(self) -> Optional[float]: ...

class TierStore(_Closes):
    """Pinned DRAM blocks backed by an optional disk directory, found again by prefix keys."""

    def __init__(
        self,
        block_size: int,
        dram_capacity: int,
        *,
        disk_dir: Union[str, PathLike[str], None] = None,
        disk_capacity: int = 0,
        policy: Literal["lru", "arc"] = "lru",
        admit_after: int = 1,
        workers: Optional[int] = None,
        pin: bool = True,
        events: bool = True,
        disk_queue_depth: Optional[int] = None,
        sync_writes: bool = False,
        remote: Optional[RemoteSettings] = None,
    ) -> None:
        """``remote``: the tier every engine shares, e.g. ``{"url": "s3://bucket/prefix",
        "namespace": "model@dtype@tp0"}`` or ``{"path": "/shared/kv", "namespace": ...}``."""
    @property
    def block_size(self) -> int: ...
    def put(self, blocks: _Blocks, *, device: str = "cpu", to_disk: bool = False) -> StoreOp:
        """With ``to_disk``, each block (one 4096-aligned host region) goes straight to the disk tier."""
    def get(self, blocks: _Blocks, *, device: str = "cpu", from_disk: bool = False) -> StoreOp:
        """With ``from_disk``, each block (one 4096-aligned host region) is read from the disk tier
        straight into it, checked, and not promoted to DRAM."""
    def lookup(self, keys: Sequence[_Bytes]) -> list[str]: ...
    def lookup_remote(self, keys: Sequence[_Bytes]) -> Optional[list[str]]:
        """``lookup``, then the remote tier ("REMOTE") for the blocks after the local prefix;
        None while the remote is being asked (ask again). Never waits on the network."""
    def flush_remote(self, timeout: float) -> bool:
        """Wait until every block queued for the remote tier is uploaded or failed."""
    def disk_keys(self) -> list[bytes]:
        """The keys of every block on the disk tier, in slot order; right after opening, the blocks
        the directory's index log held (a restart finds them again)."""
    def offload(self, keys: Sequence[_Bytes]) -> StoreOp: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, Any]:
        """Counters and occupancy; ``"remote"`` holds the remote tier's (None without one)."""
    def take_events(self) -> list[TierEvent]: ...
    def publish_events(
        self,
        endpoint: str,
        block_tokens: int,
        *,
        pod: Optional[str] = None,
        model: Optional[str] = None,
        topic: Optional[str] = None,
        replay_endpoint: Optional[str] = None,
        data_parallel_rank: Optional[int] = None,
        hashes: Literal["int", "bytes"] = "int",
        locality: Optional[Literal["LOCAL", "REMOTE"]] = "LOCAL",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
    ) -> KvEventPublisher:
        """Publish the store's events over ZMQ as vLLM's KV events (topic ``kv@<pod>@<model>``
        with ``pod`` and ``model``); raises UnsupportedError in builds without the ``kv-events``
        feature, which the default wheel is."""

class RemoteSettings(TypedDict, total=False):
    """The remote tier: ``url`` (``s3://bucket/prefix``, ``file://``) or ``path`` (a shared
    directory), and ``namespace`` (everything that makes blocks' bytes differ: model, dtype,
    block tokens, layout, tensor-parallel rank); credentials and endpoint from the ``AWS_*``
    environment or ``options`` (object_store names such as ``aws_endpoint``)."""

    url: str
    path: Union[str, PathLike[str]]
    namespace: str
    timeout: float
    concurrency: int
    max_upload_bytes: int
    failures_to_open: int
    retry_after: float
    options: dict[str, str]

class RemoteTier:
    """A client of the remote tier alone: looks blocks up without holding any."""

    def __init__(self, block_size: int, remote: RemoteSettings) -> None: ...
    def lookup(self, keys: Sequence[_Bytes]) -> Optional[int]:
        """How many leading keys the remote holds, or None while it is being asked."""
    def forget(self, keys: Sequence[_Bytes]) -> None:
        """Count keys as absent for a while (their load failed): lookups stop at them."""
    @property
    def fingerprint(self) -> str: ...
    @property
    def location(self) -> str: ...
    def stats(self) -> dict[str, Any]: ...

class KvEventPublisher:
    """A store's KV event publisher; ``close()`` (or leaving a ``with`` block) stops it."""

    @property
    def endpoint(self) -> str: ...
    @property
    def replay_endpoint(self) -> Optional[str]: ...
    @property
    def topic(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> KvEventPublisher: ...
    def __exit__(self, *exc_info: object) -> bool: ...

class StoreOp:
    """A put, get or offload in progress."""

    def poll(self) -> bool: ...
    def wait(self, timeout: Optional[float] = None) -> None: ...

class TierEvent:
    """Blocks that changed place: ``kind`` is "stored", "removed" or "moved"; "cleared" (no
    keys, no medium) follows the removals of a ``clear()`` that left the store empty."""

    @property
    def kind(self) -> Literal["stored", "removed", "moved", "cleared"]: ...
    @property
    def keys(self) -> list[bytes]: ...
    @property
    def medium(self) -> Optional[str]: ...
    @property
    def from_medium(self) -> Optional[str]: ...

def authenticate_socket(
    fd: int,
    role: Literal["client", "server"],
    timeout: float,
    *,
    secret: Optional[Union[str, bytes]] = None,
    auth: Literal["env", "none"] = "env",
) -> None:
    """Prove the cluster secret over a connected, blocking TCP socket and check the other side's."""

def cli_main(argv: Sequence[str]) -> int:
    """Run the ``kvferry`` command line ``argv`` (the program's name first); its exit status."""

def prefix_keys(tokens: Sequence[int], block_tokens: int, extra: Optional[_Bytes] = None) -> list[bytes]: ...
def chain_key(parent: Optional[_Bytes], tokens: Sequence[int], extra: Optional[_Bytes] = None) -> bytes: ...
def engine_key(hash: Union[_Bytes, int]) -> bytes: ...
