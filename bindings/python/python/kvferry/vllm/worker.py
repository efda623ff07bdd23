"""The worker side: registers the cache tensors, pulls remote blocks, serves them, copies to and from
the tiers. Nothing here blocks the engine step: pulls run on a small thread pool, tier copies on the
store's own threads, and each step only polls what finished."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kvferry
import torch
from vllm.logger import init_logger
from kvferry.vllm.config import ConnectorConfig
from kvferry.vllm.groups import windowed_groups
from kvferry.vllm.handshake import HandshakeError, RankInfo, fetch
from kvferry.vllm.layout import KvLayout, LayoutError, describe_layer, head_range, merge_regions, read_plan, sources
from kvferry.vllm.metadata import RankHandshake, RemoteLoad, StepMetadata, TierLoad, WorkerReport
from kvferry.vllm.stats import KvferryConnectorStats, StatsReader

logger = init_logger(f"vllm.{__name__}")

# Sent by a decode rank to each prefill rank it read from: "<prefix><readers> <request id>", where
# `readers` is how many decode ranks read from that prefill rank, so it knows when all are done.
DONE_PREFIX = b"kvferry-done "

# How long a step that runs no token may wait for a decode engine's "done" while this engine only
# holds leased blocks. vLLM steps such an engine without pause until the blocks are released; on a
# host it shares with its decode engines that loop takes the CPUs they need to read and decode, so
# each step waits here instead, and a request arriving meanwhile waits at most this long.
IDLE_WAIT_SECONDS = 0.05

# In each rank's disk directory: what the engine that wrote its blocks was (model, dtypes, block
# shape, rank). vLLM's block hashes name tokens, not a model, so blocks another configuration
# wrote would be found under the same hashes and loaded as this one's.
ENGINE_FILE = "engine.json"


def done_message(readers: int, request_id: str) -> bytes:
    return DONE_PREFIX + f"{readers} {request_id}".encode()


def parse_done(data: bytes) -> tuple[int, str] | None:
    if not data.startswith(DONE_PREFIX):
        return None
    readers, _, request_id = data[len(DONE_PREFIX) :].decode(errors="replace").partition(" ")
    if not readers.isdigit() or not request_id:
        return None
    return int(readers), request_id


def _unpin() -> set[int]:
    """Let the calling thread, and the threads it starts, run on every CPU of the host; returns
    the CPUs it was pinned to.

    vLLM's CPU backend pins the worker's thread (and so every thread it starts) to the cores its
    OpenMP threads spin on; transfer and copy threads pinned there starve while the engine steps.
    """
    pinned = os.sched_getaffinity(0)
    try:
        # The engine core process, the worker's parent, keeps the CPUs vLLM was started with.
        host = os.sched_getaffinity(os.getppid())
    except OSError:
        host = set(range(os.cpu_count() or 1))
    os.sched_setaffinity(0, host | pinned)
    return pinned


@contextlib.contextmanager
def _unpinned():
    """Threads started inside run on every host CPU; the caller keeps its own pinning."""
    pinned = _unpin()
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)


@dataclass
class _Pull:
    load: RemoteLoad
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    done: bool = False


class ConnectorWorker:
    def __init__(self, cfg: ConnectorConfig, vllm_config: Any, kv_cache_config: Any):
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.cfg = cfg
        self.kv_cache_config = kv_cache_config
        self.block_tokens = vllm_config.cache_config.block_size
        # Per KV cache group: a sliding window gives blocks back while its request runs.
        self.windowed = windowed_groups(kv_cache_config, self.block_tokens)
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.tp_rank = get_tensor_model_parallel_rank()
        self.total_heads = vllm_config.model_config.get_total_num_kv_heads()
        model, cache = vllm_config.model_config, vllm_config.cache_config
        self._engine = {
            "model": str(model.model),
            "revision": model.revision,
            "dtype": str(model.dtype),
            "cache_dtype": str(cache.cache_dtype),
            "hash_algo": str(cache.prefix_caching_hash_algo),
            "block_tokens": self.block_tokens,
            "tp_size": self.tp_size,
            "tp_rank": self.tp_rank,
        }
        # Keys the disk tier kept from an earlier engine, until the handshake hands them over.
        self._persisted: list[bytes] = []
        self.agent: kvferry.Agent | None = None
        self.store: kvferry.TierStore | None = None
        self._remote_settings: dict[str, Any] | None = None
        # One per KV cache group; a tier entry holds a token block's bytes of every group.
        self.layouts: list[KvLayout] = []
        self.device = "cpu"
        # Where a load puts the bytes of a group that holds no block there (outside a window).
        self._discard: Any = None
        # Guards the remote engines' handshakes and peers, which the pull threads fill.
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=2,
            thread_name_prefix="kvferry-pull",
            initializer=_unpin,
        )
        self._remote: dict[str, dict[int, RankInfo]] = {}
        self._peers: dict[tuple[str, int], str] = {}
        # Prefill side: held requests and the decode readers that said they are done.
        self._held: dict[str, float | None] = {}
        self._done_readers: dict[str, list[int]] = defaultdict(list)
        # Loads in flight, by request.
        self._pulls: dict[str, _Pull] = {}
        self._tier_loads: dict[str, tuple[TierLoad, Any]] = {}
        self._stores: dict[str, list[Any]] = defaultdict(list)
        self._error_blocks: set[int] = set()
        self._failed_keys: list[bytes] = []
        self._stats = StatsReader()
        # The cache tensors and their registrations with the agent (none while vLLM sleeps).
        self._kv_caches: dict[str, Any] = {}
        self._registrations: list[Any] = []

    # Set up.

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        num_blocks = self.kv_cache_config.num_blocks
        heads = head_range(self.tp_rank, self.tp_size, self.total_heads)
        layouts = []
        for group in self.kv_cache_config.kv_cache_groups:
            layers, seen = [], set()
            for name in group.layer_names:
                tensor = kv_caches.get(name)
                if tensor is None or tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
                layers.append(describe_layer(name, tensor, num_blocks, heads[1] - heads[0]))
            layouts.append(KvLayout(layers, self.block_tokens, num_blocks))
        self.layouts = layouts
        first = next(iter(kv_caches.values()))
        device = first.device
        self._discard = first.new_empty(max(g.block_bytes for g in layouts), dtype=torch.uint8)
        self.device = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
        with _unpinned():
            self.agent = kvferry.Agent(
                f"{self.cfg.engine_id}/{self.tp_rank}",
                host=self.cfg.host,
                shm=self.cfg.shm,
                fabric_provider=self.cfg.fabric_provider,
                cuda_device=device.index or 0 if device.type == "cuda" else None,
                options=self.cfg.agent_options,
                **self.cfg.auth_kwargs(),
            )
        self._kv_caches = kv_caches
        self._register_memory()
        if self.cfg.offload is not None:
            self._open_store()
        logger.info(
            "kvferry: rank %d/%d registered %d layers in %d groups (%d with a sliding window), %d bytes a "
            "block, layout offsets %s",
            self.tp_rank,
            self.tp_size,
            sum(len(g.layers) for g in layouts),
            len(layouts),
            sum(self.windowed),
            self._entry_bytes(),
            layouts[0].layers[0].offsets,
        )

    def _register_memory(self) -> None:
        assert self.agent is not None
        storages = {}
        for tensor in self._kv_caches.values():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        self._registrations = [self.agent.register_ptr(ptr, n, self.device) for ptr, n in storages.items()]

    def unregister_kv_caches(self) -> None:
        """vLLM is going to sleep (its transfers drained): the cache memory is remapped or freed,
        so peers must not read it, nor the agent write it, until `restore_kv_caches`."""
        for registration in self._registrations:
            registration.deregister()
        self._registrations = []

    def restore_kv_caches(self) -> None:
        """After wake-up: register the cache tensors again (vLLM keeps their addresses)."""
        if self.agent is not None and not self._registrations:
            self._register_memory()

    def _open_store(self) -> None:
        off = self.cfg.offload
        assert off is not None
        disk_dir = None if off.disk_dir is None else f"{off.disk_dir}/rank{self.tp_rank}"
        self._remote_settings = None if off.remote is None else self._remote_namespace(off.remote)
        with _unpinned():
            self.store = kvferry.TierStore(
                self._entry_bytes(),
                off.dram_bytes,
                disk_dir=disk_dir,
                disk_capacity=off.disk_bytes,
                policy=off.policy,
                admit_after=off.admit_after,
                remote=self._remote_settings,
            )
        if disk_dir is not None:
            self._persisted = self._reuse_disk(disk_dir, off.clear_on_start)

    def _layout_identity(self) -> dict[str, Any]:
        """Everything that makes this rank's block bytes differ from another engine's: the model,
        dtypes, tokens per block, tensor-parallel rank and the layout of a block."""
        return {
            **self._engine,
            "block_bytes": self._entry_bytes(),
            "layers": [
                [x.name, x.segment_len, len(x.offsets), x.head_len, x.num_heads] for g in self.layouts for x in g.layers
            ],
        }

    def _remote_namespace(self, remote: dict[str, Any]) -> dict[str, Any]:
        """The remote settings with this rank's namespace: engines share blocks exactly when they
        hold the same bytes for a key (and name the same "namespace", if they give one)."""
        identity = json.dumps(self._layout_identity(), sort_keys=True, separators=(",", ":"))
        given = remote.get("namespace")
        return {**remote, "namespace": identity if given is None else f"{given}/{identity}"}

    def _reuse_disk(self, disk_dir: str, clear: bool) -> list[bytes]:
        """The keys of the blocks an earlier engine left in `disk_dir`, for the scheduler to find
        again; the tier is emptied instead when asked to, or when that engine was another
        configuration (`ENGINE_FILE`)."""
        assert self.store is not None and self.layouts
        engine = self._layout_identity()
        path = os.path.join(disk_dir, ENGINE_FILE)
        try:
            with open(path) as f:
                before = json.load(f)
        except FileNotFoundError:
            before = None
        except (OSError, ValueError) as e:
            before = f"unreadable: {e}"
        keys = self.store.disk_keys()
        if keys and not clear and before != engine:
            logger.warning(
                "kvferry: %s holds %d blocks of another engine (%s, now %s): emptying it", disk_dir, len(keys), before, engine
            )
            clear = True
        if clear:
            self.store.clear()
            keys = []
        # Written while the store holds the directory's lock, so no other engine writes it too.
        with open(path + ".tmp", "w") as f:
            json.dump(engine, f)
        os.replace(path + ".tmp", path)
        logger.info("kvferry: rank %d found %d blocks in %s", self.tp_rank, len(keys), disk_dir)
        return keys

    def handshake(self) -> RankHandshake | None:
        persisted, self._persisted = self._persisted, []
        remote = self._remote_settings if self.store is not None else None
        block_bytes = self._entry_bytes() if self.layouts else 0
        if not self.cfg.pd or self.agent is None:
            return RankHandshake(None, persisted, remote, block_bytes) if self.store is not None else None
        info = RankInfo(
            self.cfg.engine_id, self.tp_rank, self.tp_size, self.total_heads, self.agent.metadata(), tuple(self.layouts)
        )
        return RankHandshake(info.to_dict(), persisted, remote, block_bytes)

    # Each step.

    def handle_preemptions(self, meta: StepMetadata) -> None:
        # A preempted request's blocks go back to the pool: stores reading them must end first.
        for req in meta.preempted:
            self._wait_stores(req)

    def start(self, meta: StepMetadata) -> None:
        if any(self.windowed):
            # A sliding window gives blocks back while their request runs, and this step may write
            # them for another: the stores still reading them end first.
            for req in list(self._stores):
                self._wait_stores(req)
        if meta.clear_tiers and self.store is not None:
            self.store.clear()
        self._held.update(meta.held)
        for req in meta.cancelled_loads:
            pull = self._pulls.get(req)
            if pull is not None:
                pull.cancelled.set()
        for load in meta.remote_loads:
            pull = _Pull(load)
            self._pulls[load.req_id] = pull
            self._pool.submit(self._pull, pull)
        for load in meta.tier_loads:
            self._start_tier_load(load)

    def save(self, meta: StepMetadata) -> None:
        if self.store is None:
            return
        for spec in meta.stores:
            blocks = [(key, self._entry_regions(ids)) for key, ids in zip(spec.keys, spec.block_ids)]
            try:
                self._stores[spec.req_id].append(self.store.put(blocks, device=self.device))
            except kvferry.KvferryError as e:
                # A cache that cannot take a block only misses it later.
                logger.info("kvferry: storing %d blocks of %s skipped: %s", len(blocks), spec.req_id, e)

    def results(self, idle: bool = False) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since the last call. In an
        `idle` step (no token scheduled) with nothing in flight but held blocks, first wait, at most
        `IDLE_WAIT_SECONDS`, for a reader's "done" or the next lease to end."""
        now = time.time()
        if self.agent is not None:
            wait = 0.0
            if idle and self._held and not (self._pulls or self._tier_loads or self._stores):
                holding = [self._holding_for(req, expiry, now) for req, expiry in self._held.items()]
                wait = min([IDLE_WAIT_SECONDS, *holding])
            notes = self.agent.wait_notifications(wait) if wait > 0 else self.agent.take_notifications()
            now = time.time()
            for _peer, data in notes:
                parsed = parse_done(data)
                if parsed is not None:
                    self._done_readers[parsed[1]].append(parsed[0])
        for req in list(self._stores):
            self._stores[req] = [op for op in self._stores[req] if not self._finished_op(op, req)]
            if not self._stores[req]:
                del self._stores[req]
        sending = set()
        for req, expiry in list(self._held.items()):
            if req in self._stores:
                continue
            if self._holding_for(req, expiry, now) > 0:
                continue
            if expiry is not None and not self._all_read(req):
                logger.warning("kvferry: lease of %s ended before its decode side read it", req)
            sending.add(req)
            del self._held[req]
            self._done_readers.pop(req, None)
        recving, failed = set(), set()
        for req, pull in list(self._pulls.items()):
            if pull.done:
                del self._pulls[req]
                # A load that only released the prefill's blocks had vLLM wait for nothing.
                if any(pull.load.block_ids):
                    recving.add(req)
                if pull.error is not None and not pull.cancelled.is_set():
                    self._fail(req, pull.load.block_ids, pull.error, failed)
        for req, (load, op) in list(self._tier_loads.items()):
            try:
                if not op.poll():
                    continue
            except kvferry.KvferryError as e:
                self._fail(req, [list(g) for g in zip(*load.block_ids)], str(e), failed)
                self._failed_keys.extend(load.keys)
            del self._tier_loads[req]
            recving.add(req)
        return sending, recving, failed

    def _all_read(self, req: str) -> bool:
        readers = self._done_readers.get(req, [])
        return bool(readers) and len(readers) >= readers[0]

    def _holding_for(self, req: str, expiry: float | None, now: float) -> float:
        """Seconds until a held request's blocks go back, unless a reader says done first (0: now)."""
        if expiry is None or self._all_read(req):
            return 0.0
        return max(0.0, expiry - now)

    def take_error_blocks(self) -> set[int]:
        blocks, self._error_blocks = self._error_blocks, set()
        return blocks

    def stats(self) -> KvferryConnectorStats | None:
        """What the agent and the store counted since the last call; None if nothing."""
        return self._stats.report(self.agent, self.store)

    def report(self) -> WorkerReport | None:
        if self.store is None:
            return None
        events = [(self.tp_rank, e.kind, list(e.keys), e.medium, e.from_medium) for e in self.store.take_events()]
        failed, self._failed_keys = self._failed_keys, []
        return WorkerReport(events, failed) if events or failed else None

    def shutdown(self) -> None:
        for pull in self._pulls.values():
            pull.cancelled.set()
        self._pool.shutdown(wait=True)
        for req in list(self._stores):
            self._wait_stores(req)
        if self.store is not None:
            # Blocks still queued for the shared tier are worth a short wait: other engines find them.
            if not self.store.flush_remote(self.cfg.timeout_seconds):
                logger.warning("kvferry: some blocks were not uploaded to the remote tier before shutdown")
            self.store.close()
        if self.agent is not None:
            self.agent.close()

    # Helpers.

    def _fail(self, req: str, block_ids: list[list[int | None]], error: str, failed: set[str]) -> None:
        """`block_ids`: per KV cache group, the blocks the load was to fill."""
        logger.warning("kvferry: loading the KV blocks of %s failed: %s", req, error)
        self._stats.load_failures += 1
        # Block-level reports let vLLM keep what loaded; they are unambiguous with one group only.
        if len(self.layouts) == 1:
            self._error_blocks.update(b for b in block_ids[0] if b is not None)
        else:
            failed.add(req)

    def _finished_op(self, op: Any, req: str) -> bool:
        try:
            return bool(op.poll())
        except kvferry.KvferryError as e:
            logger.info("kvferry: a store for %s failed: %s", req, e)
            return True

    def _wait_stores(self, req: str) -> None:
        for op in self._stores.pop(req, []):
            try:
                op.wait(self.cfg.timeout_seconds)
            except (kvferry.KvferryError, TimeoutError) as e:
                logger.info("kvferry: a store for %s failed: %s", req, e)

    def _start_tier_load(self, load: TierLoad) -> None:
        assert self.store is not None
        blocks = [(key, self._entry_regions(ids)) for key, ids in zip(load.keys, load.block_ids)]
        try:
            op = self.store.get(blocks, device=self.device)
        except kvferry.KvferryError as e:
            op = _Failed(e)
        self._tier_loads[load.req_id] = (load, op)

    def _pull(self, pull: _Pull) -> None:
        load = pull.load
        try:
            self._read(pull)
        except _Cancelled:
            logger.info("kvferry: %s ended while its blocks were being pulled; pull cancelled", load.req_id)
        except (kvferry.KvferryError, HandshakeError, LayoutError, TimeoutError, OSError) as e:
            pull.error = f"{type(e).__name__}: {e}"
        except Exception as e:  # a bug must not leave the request waiting forever
            logger.exception("kvferry: pulling %s", load.req_id)
            pull.error = f"{type(e).__name__}: {e}"
        finally:
            if pull.error is not None:
                # The engine may have restarted elsewhere under the same id: ask again next time.
                self._forget(load.remote_engine_id)
            pull.done = True

    def _read(self, pull: _Pull) -> None:
        load = pull.load
        assert self.agent is not None
        remote = self._remote_ranks(load.remote_engine_id, load.remote_host, load.remote_port)
        holders = {r: (info.tp_size, info.total_heads) for r, info in remote.items()}
        chosen = sources(self.tp_rank, self.tp_size, self.total_heads, holders)
        mine = head_range(self.tp_rank, self.tp_size, self.total_heads)
        transfers = []
        for r in chosen:
            info = remote[r]
            peer = self._peer(load.remote_engine_id, r, info)
            readers = sum(r in sources(d, self.tp_size, self.total_heads, holders) for d in range(self.tp_size))
            message = done_message(readers, load.remote_request_id)
            pairs = self._read_pairs(load, mine, info, head_range(r, info.tp_size, info.total_heads))
            if not pairs:
                transfers.append(self.agent.notify(peer, message, self.cfg.timeout_seconds))
                continue
            local = self.agent.prepare_local([p[0] for p in pairs])
            far = self.agent.prepare_remote(peer, [p[1] for p in pairs])
            idx = list(range(len(pairs)))
            transfers.append(
                self.agent.read(local, idx, far, idx, notification=message, timeout=self.cfg.timeout_seconds)
            )
        try:
            for t in transfers:
                while not t.poll():
                    if pull.cancelled.is_set():
                        raise _Cancelled()
                    try:
                        t.wait(0.05)
                    except TimeoutError:
                        pass
        except BaseException:
            # Nothing may still write into the blocks once vLLM hears this load ended.
            for t in transfers:
                t.cancel()
                try:
                    t.wait(self.cfg.timeout_seconds)
                except (kvferry.KvferryError, TimeoutError):
                    pass
            raise

    def _read_pairs(
        self, load: RemoteLoad, mine: tuple[int, int], info: RankInfo, theirs: tuple[int, int]
    ) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """`(local, remote)` regions of every group's blocks that this rank reads from `info`'s."""
        groups = len(self.layouts)
        if len(info.layouts) != groups or len(load.block_ids) != groups or len(load.remote_block_ids) != groups:
            raise LayoutError(
                f"{groups} KV cache groups here, {len(info.layouts)} on the prefill engine, "
                f"{len(load.remote_block_ids)} in its block ids"
            )
        pairs = []
        for layout, remote, local_ids, remote_ids in zip(self.layouts, info.layouts, load.block_ids, load.remote_block_ids):
            # Where this engine's window has no block, the prefill engine's bytes are not needed.
            kept = [(lb, rb) for lb, rb in zip(local_ids, remote_ids) if lb is not None]
            if any(rb is None for _, rb in kept):
                raise LayoutError("the prefill engine gave back blocks of a sliding window that this engine needs")
            local = [lb for lb, _ in kept]
            pairs.extend(read_plan(layout, mine, remote, theirs, local, [rb for _, rb in kept]))
        return pairs

    def _entry_bytes(self) -> int:
        """Bytes of a tier entry: a token block of every KV cache group."""
        return sum(g.block_bytes for g in self.layouts)

    def _entry_regions(self, block_ids: list[int | None]) -> list[tuple[int, int]]:
        """Where a tier entry's bytes go or come from: the block of each group in turn, or where
        a load discards them for a group that holds none there."""
        regions = []
        for layout, block in zip(self.layouts, block_ids):
            if block is None:
                regions.append((self._discard.data_ptr(), layout.block_bytes))
            else:
                regions.extend(layout.block_regions(block))
        return merge_regions(regions)

    def _remote_ranks(self, engine: str, host: str, port: int) -> dict[int, RankInfo]:
        with self._lock:
            cached = self._remote.get(engine)
        if cached is not None:
            return cached
        ranks = fetch(host, port, self.cfg.timeout_seconds, self.cfg.auth_kwargs())
        if any(info.engine_id != engine for info in ranks.values()):
            raise HandshakeError(f"{host}:{port} serves another engine than {engine}")
        with self._lock:
            self._remote[engine] = ranks
        return ranks

    def _forget(self, engine: str) -> None:
        assert self.agent is not None
        with self._lock:
            self._remote.pop(engine, None)
            gone = [key for key in self._peers if key[0] == engine]
            names = [self._peers.pop(key) for key in gone]
        for name in names:
            try:
                self.agent.remove_peer(name)
            except kvferry.KvferryError:
                pass

    def _peer(self, engine: str, rank: int, info: RankInfo) -> str:
        assert self.agent is not None
        with self._lock:
            name = self._peers.get((engine, rank))
            if name is None:
                name = self.agent.add_peer(info.agent_metadata)
                self._peers[(engine, rank)] = name
        return name


class _Cancelled(Exception):
    """The request ended while its blocks were being pulled."""


class _Failed:
    """A tier load that failed before it started: its error comes at the next poll, as any."""

    def __init__(self, error: kvferry.KvferryError):
        self.error = error

    def poll(self) -> bool:
        raise self.error
