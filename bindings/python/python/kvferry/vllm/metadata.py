"""What the scheduler-side connector tells its workers each step, and what they tell it back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class RemoteLoad:
    """Pull a finished prefill's blocks from a remote engine into `block_ids`: per KV cache group,
    the local and the remote block of each token block, None where that side's group holds none
    (outside a sliding window)."""

    req_id: str
    block_ids: list[list[int | None]]
    remote_block_ids: list[list[int | None]]
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int


@dataclass
class TierLoad:
    """Copy cached blocks back from the tiers: `keys[i]` into the blocks `block_ids[i]`, one per KV
    cache group (None: the group holds none there, its bytes are not needed)."""

    req_id: str
    block_ids: list[list[int | None]]
    keys: list[bytes]


@dataclass
class TierSave:
    """Copy computed blocks into the tiers once this step's forward pass wrote them: `keys[i]` from
    the blocks `block_ids[i]`, one per KV cache group."""

    req_id: str
    block_ids: list[list[int]]
    keys: list[bytes]


@dataclass
class StepMetadata(KVConnectorMetadata):
    remote_loads: list[RemoteLoad] = field(default_factory=list)
    tier_loads: list[TierLoad] = field(default_factory=list)
    stores: list[TierSave] = field(default_factory=list)
    # Finished requests whose blocks this connector holds: request id -> the wall-clock time the
    # prefill lease ends (None: no remote reader, only stores in flight).
    held: dict[str, float | None] = field(default_factory=dict)
    # Requests that ended while their blocks were being loaded.
    cancelled_loads: set[str] = field(default_factory=set)
    preempted: set[str] = field(default_factory=set)
    # Empty the tiers (vLLM's `reset_prefix_cache(reset_connector=True)`).
    clear_tiers: bool = False
    # The step runs no token: vLLM steps only to hear which held blocks are released.
    idle: bool = False


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    """Tier changes seen by workers: `(rank, kind, keys, medium, from_medium)` each."""

    tier_events: list[tuple[int, str, list[bytes], str | None, str | None]] = field(default_factory=list)
    # Keys of tier loads that failed: the scheduler stops finding them in the remote tier, so that a
    # rescheduled request computes them instead of loading them again.
    failed_keys: list[bytes] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, WorkerReport)
        return WorkerReport(self.tier_events + other.tier_events, self.failed_keys + other.failed_keys)


@dataclass
class RankHandshake(KVConnectorHandshakeMetadata):
    """What a worker rank tells the scheduler once, at start: its `RankInfo` as a dict (P/D; None
    without), the keys its disk tier kept from an earlier engine on the same directory, which
    the scheduler's index starts with, and its remote tier (settings with the rank's namespace, and
    its block size), which the scheduler looks blocks up in."""

    info: dict[str, Any] | None
    persisted: list[bytes] = field(default_factory=list)
    remote: dict[str, Any] | None = None
    block_bytes: int = 0
