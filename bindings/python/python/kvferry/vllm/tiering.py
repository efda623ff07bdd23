"""kvferry's disk tier as a secondary tier of vLLM's tiered offloading (`TieringOffloadingSpec`).

vLLM keeps offloaded blocks in its primary CPU region (one row of ``block_size_bytes`` per chunk)
and cascades every stored chunk to its secondary tiers. `KvferryTier` is such a tier: each chunk is
written from its row straight to kvferry's disk tier (``TierStore.put(..., to_disk=True)``, an
``O_DIRECT`` write through io_uring on the store's own threads) and read back from the disk straight
into the row vLLM gives for a promotion (``get(..., from_disk=True)``), checked against its checksum
where it lands. Python passes row addresses only; no byte goes through Python.

Loaded by vLLM's `SecondaryTierFactory` through ``module_path``::

    "secondary_tiers": [{"type": "KvferryTier", "module_path": "kvferry.vllm.tiering",
                         "root_dir": "/nvme/kvferry", "disk_bytes": 200 << 30}]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats
from vllm.logger import init_logger
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingGaugeMetadata,
    OffloadingMetricMetadata,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
)
from vllm.v1.kv_offload.file_mapper import FileMapper
from vllm.v1.kv_offload.tiering.base import JobId, JobResult, SecondaryTierManager, TransferJob

import kvferry

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

logger = init_logger(f"vllm.{__name__}")

# What the tier reports to vLLM's metrics each `get_stats`, one entry per metric: the name, the
# `TierStore.stats()` entry it comes from (None: counted by the tier itself), whether it is a gauge
# (the value now) or a counter (increments since the last call), and its help text. Both
# `build_metric_definitions` and `get_stats` read this list.
METRICS: tuple[tuple[str, str | None, bool, str], ...] = (
    ("vllm:kv_offload_kvferry_disk_blocks", "disk_blocks", True, "Blocks in kvferry's disk tier."),
    (
        "vllm:kv_offload_kvferry_disk_capacity_blocks",
        "disk_capacity_blocks",
        True,
        "Blocks kvferry's disk tier holds when full.",
    ),
    ("vllm:kv_offload_kvferry_disk_writes", "disk_writes", False, "Blocks written to kvferry's disk tier."),
    ("vllm:kv_offload_kvferry_disk_hits", "disk_hits", False, "Blocks read from kvferry's disk tier."),
    (
        "vllm:kv_offload_kvferry_disk_evictions",
        "disk_evictions",
        False,
        "Blocks evicted from kvferry's disk tier to make room.",
    ),
    (
        "vllm:kv_offload_kvferry_corrupt_blocks",
        "corrupt_blocks",
        False,
        "Blocks that failed their checksum on read and were dropped (their load failed).",
    ),
    ("vllm:kv_offload_kvferry_failed_stores", None, False, "Store jobs of kvferry's tier that failed."),
    ("vllm:kv_offload_kvferry_failed_loads", None, False, "Load jobs of kvferry's tier that failed."),
)

# Keys longer than the store takes verbatim (vLLM's sha256 block hash plus its 4-byte group index
# is 36 bytes) are folded to 32 bytes: blake2b, so that distinct keys stay distinct.
_MAX_KEY = 32


def block_key(key: bytes) -> bytes:
    """The store's key for one of vLLM's offload keys."""
    if len(key) <= _MAX_KEY:
        return bytes(key)
    return hashlib.blake2b(key, digest_size=_MAX_KEY).digest()


@dataclass
class _Job:
    op: kvferry.StoreOp | None
    keys: list[OffloadKey]
    is_store: bool
    started: float
    # The error it failed with when it could not even start.
    refused: Exception | None = None


class KvferryTier(SecondaryTierManager):
    """A vLLM secondary tier (medium STORAGE) backed by kvferry's disk tier.

    Settings (the tier's dict in ``secondary_tiers``, besides ``type`` and ``module_path``):
    ``root_dir`` (required): where the tier keeps its files, in a subdirectory named after the model
    and the cache layout as vLLM's own file system tier names them; ``disk_bytes`` (required): the
    preallocated size of the block file; ``workers`` (2): threads, each with its own io_uring;
    ``queue_depth`` (32): reads or writes each keeps in flight; ``sync_writes`` (False): fsync after
    each batch so that the index survives power loss too; ``enable_kv_events`` (False): report
    stored and removed blocks when vLLM's KV events are on; ``locality``: "LOCAL" or "REMOTE".
    """

    medium: ClassVar[Medium] = Medium.STORAGE

    @classmethod
    def build_metric_definitions(cls, extra_config: dict[str, Any]) -> dict[str, OffloadingMetricMetadata]:
        definitions: dict[str, OffloadingMetricMetadata] = {}
        for name, _, gauge, documentation in METRICS:
            kind = OffloadingGaugeMetadata if gauge else OffloadingCounterMetadata
            definitions[name] = kind(documentation=documentation, labelnames=("tier",))
        return definitions

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        root_dir: str,
        disk_bytes: int,
        workers: int = 2,
        queue_depth: int = 32,
        sync_writes: bool = False,
        enable_kv_events: bool = False,
        locality: str | None = None,
        backpressure_detector: BackpressureDetector | None = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality is not None else None
        stride = self.block_size_bytes
        # A zero-copy array over the primary region, for its address. Holding it keeps a buffer
        # export on the region, so the region cannot be unmapped while the store may still read or
        # write its rows; `shutdown` lets go of it once every job has ended.
        self._rows: np.ndarray | None = np.asarray(primary_kv_view)
        if self._rows.ndim != 2 or self._rows.strides[0] != stride:
            raise ValueError(f"the primary region is not rows of {stride} bytes: shape {self._rows.shape}")
        self._base: int = self._rows.ctypes.data
        self._num_rows: int = self._rows.shape[0]

        # The same namespace vLLM's file system tier uses: blocks of another model, dtype or layout
        # live in another directory, so a shared root never serves them here.
        mapper = FileMapper.from_offloading_spec(
            root_dir=root_dir,
            offloading_spec=offloading_spec,
            blocks_per_file=offloading_spec.blocks_per_chunk,
            parallel_agnostic=True,
        )
        self.disk_dir: str = mapper.base_path
        os.makedirs(self.disk_dir, exist_ok=True)
        config_path = mapper.get_config_file_path()
        if not os.path.exists(config_path):
            with open(config_path, "w") as f:
                json.dump(mapper.get_run_config(), f, indent=2, sort_keys=True)

        events = enable_kv_events and offloading_spec.kv_events_config.enable_kv_cache_events
        if enable_kv_events and not events:
            logger.warning(
                "enable_kv_events is set on secondary tier %r but KV cache events are disabled "
                "globally; the tier will not emit events.",
                tier_type,
            )
        # The store's DRAM level is never used (blocks go straight to disk and back), so it gets
        # the least it can have: one unpinned block.
        self._store = kvferry.TierStore(
            stride,
            stride,
            disk_dir=self.disk_dir,
            disk_capacity=disk_bytes,
            workers=workers,
            pin=False,
            events=events,
            disk_queue_depth=queue_depth,
            sync_writes=sync_writes,
        )
        self._events: list[OffloadingEvent] | None = [] if events else None
        # With events, the store's key → vLLM's, for the store's events (which name the store's
        # keys): every key submitted or found here and still on disk; a key stored before a restart
        # and not looked up since has no entry, and its removal is not reported.
        self._offload_keys: dict[bytes, OffloadKey] | None = {} if events else None
        self._jobs: dict[JobId, _Job] = {}
        self._failed_stores = 0
        self._failed_loads = 0
        self._reported: dict[str, int] = {}
        logger.info(
            "kvferry tier %r: %d-byte blocks in %s (%d bytes)", tier_type, stride, self.disk_dir, disk_bytes
        )

    def _blocks(self, keys: Collection[OffloadKey], chunk_ids: np.ndarray) -> list[tuple[bytes, list[tuple[int, int]]]]:
        if len(keys) != len(chunk_ids):
            raise ValueError(f"{len(keys)} keys for {len(chunk_ids)} chunks")
        stride = self.block_size_bytes
        blocks = []
        for key, chunk in zip(keys, chunk_ids):
            chunk = int(chunk)
            if not 0 <= chunk < self._num_rows:
                raise ValueError(f"chunk {chunk} is outside the primary region's {self._num_rows} rows")
            bkey = block_key(key)
            if self._offload_keys is not None:
                self._offload_keys[bkey] = key
            blocks.append((bkey, [(self._base + chunk * stride, stride)]))
        return blocks

    def _submit(self, job: TransferJob, is_store: bool) -> None:
        keys = list(job.keys)
        record = _Job(op=None, keys=keys, is_store=is_store, started=time.monotonic())
        try:
            blocks = self._blocks(keys, job.chunk_ids)
            if is_store:
                record.op = self._store.put(blocks, to_disk=True)
            else:
                record.op = self._store.get(blocks, from_disk=True)
        except Exception as e:  # reported as a failed job, as vLLM expects of any failure
            record.refused = e
        self._jobs[job.job_id] = record

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        # The store answers from its index under its lock, which no disk write or log append holds.
        bkey = block_key(key)
        if self._store.lookup([bkey]) == ["DISK"]:
            if self._offload_keys is not None:
                self._offload_keys[bkey] = key
            return LookupResult.HIT
        return LookupResult.MISS

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, is_store=True)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, is_store=False)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        results = []
        now = time.monotonic()
        for job_id, job in list(self._jobs.items()):
            error = job.refused
            if error is None:
                try:
                    if not job.op.poll():
                        continue
                except Exception as e:
                    error = e
            del self._jobs[job_id]
            if error is not None:
                logger.warning(
                    "kvferry tier %r: %s job %d of %d blocks failed: %s",
                    self.tier_type,
                    "store" if job.is_store else "load",
                    job_id,
                    len(job.keys),
                    error,
                )
                if job.is_store:
                    self._failed_stores += 1
                    self._forget_unstored(job.keys)
                else:
                    self._failed_loads += 1
            results.append(
                JobResult(
                    job_id=job_id,
                    success=error is None,
                    transfer_time=now - job.started,
                    transfer_bytes=len(job.keys) * self.block_size_bytes,
                )
            )
        return results

    def _forget_unstored(self, keys: list[OffloadKey]) -> None:
        """Drop the key mapping of a failed store's blocks that did not reach the disk."""
        if self._offload_keys is None:
            return
        for key in keys:
            bkey = block_key(key)
            if self._store.lookup([bkey]) != ["DISK"]:
                self._offload_keys.pop(bkey, None)

    def has_pending_work(self) -> bool:
        return bool(self._jobs)

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self._events is None or self._offload_keys is None:
            return
        for event in self._store.take_events():
            if event.medium != "DISK":
                continue
            removed = event.kind == "removed"
            keys = []
            for bkey in event.keys:
                key = self._offload_keys.pop(bkey, None) if removed else self._offload_keys.get(bkey)
                if key is not None:
                    keys.append(key)
            if keys:
                self._events.append(
                    OffloadingEvent(
                        keys=keys,
                        medium=self.medium,
                        removed=removed,
                        locality=self.locality,
                        ownership="kvferry",
                        # Evictions and dropped blocks are reported as removals.
                        removal_expected=True,
                    )
                )
        yield from self._events
        self._events.clear()

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def drain_jobs(self) -> None:
        for job in self._jobs.values():
            if job.op is None:
                continue
            try:
                job.op.wait()
            except Exception:
                pass  # reported by the next get_finished_jobs

    def get_stats(self) -> OffloadingConnectorStats | None:
        stats = self._store.stats()
        own = {
            "vllm:kv_offload_kvferry_failed_stores": self._failed_stores,
            "vllm:kv_offload_kvferry_failed_loads": self._failed_loads,
        }
        out = OffloadingConnectorStats()
        labels = (self.tier_type,)
        for name, source, gauge, _ in METRICS:
            value = stats[source] if source is not None else own[name]
            if gauge:
                out.set_gauge(name, value, labels)
                continue
            increase = value - self._reported.get(name, 0)
            self._reported[name] = value
            if increase:
                out.increase_counter(name, increase, labels)
        return out

    def shutdown(self) -> None:
        self.drain_jobs()
        self._store.close()
        # Every job has ended: the region may be unmapped now.
        self._rows = None
