"""The scheduler side: decides what each step loads, stores and holds, and keeps the index of what
the workers' tiers hold (from the tier events they report), so prefix lookups never leave the
scheduler process."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from vllm.distributed import kv_events as ev
from vllm.logger import init_logger
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.request import RequestStatus

import kvferry
from kvferry.vllm.config import ConnectorConfig
from kvferry.vllm.groups import windowed_groups
from kvferry.vllm.handshake import HandshakeServer, RankInfo
from kvferry.vllm.metadata import RankHandshake, RemoteLoad, StepMetadata, TierLoad, TierSave, WorkerReport

logger = init_logger(f"vllm.{__name__}")

_REMOTE_KEYS = ("remote_block_ids", "remote_engine_id", "remote_request_id", "remote_host", "remote_port")
# Where a block lives across ranks: the medium farthest from the engine any rank keeps it in.
_MEDIUM_ORDER = {"CPU": 0, "DISK": 1}
# The shared tier's medium: its blocks are looked up there (`RemoteTier`), not kept in the index.
_REMOTE = "REMOTE"
_MAX_UPLOADS_TRACKED = 1 << 16
# The store's media as vLLM's KV events name them, spelled once for every publisher of kvferry.
_VLLM_MEDIUM = kvferry.KV_EVENT_MEDIUM


@dataclass
class _Match:
    kind: str  # "remote" or "tier"
    num_computed: int
    num_external: int


@dataclass
class _Pending:
    """A block scheduled for storing, with what its Stored event will say."""

    engine_hash: Any
    parent_hash: Any
    token_ids: list[int]


class ConnectorScheduler:
    def __init__(self, cfg: ConnectorConfig, vllm_config: Any, kv_cache_config: Any):
        self.cfg = cfg
        self.block_tokens = vllm_config.cache_config.block_size
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        # Refuses, at start, a model with a group the connector cannot serve.
        self.groups = len(windowed_groups(kv_cache_config, self.block_tokens))
        self.hash_algo = str(vllm_config.cache_config.prefix_caching_hash_algo)
        self.offload = cfg.offload is not None
        policy = getattr(vllm_config.kv_transfer_config, "kv_load_failure_policy", None)
        if self.offload and cfg.offload.remote is not None and policy == "fail":
            logger.warning(
                "kvferry: with a remote tier, a block that cannot be loaded (a corrupt object, an unreachable "
                'store) fails its request under kv_load_failure_policy="fail"; "recompute" computes it instead'
            )
        self.kv_cache_manager: Any = None
        self.server: HandshakeServer | None = None
        self._step = StepMetadata()
        self._matches: dict[str, _Match] = {}
        self._requests: dict[str, Any] = {}
        self._keys: dict[str, list[bytes]] = {}
        self._stored_upto: dict[str, int] = {}
        self._storing: set[str] = set()
        self._loading: set[str] = set()
        self._pending: dict[bytes, _Pending] = {}
        self._index: dict[bytes, dict[int, str]] = {}
        self._hashes: dict[bytes, Any] = {}
        self._events: list[Any] = []
        # Each rank's view of the shared tier (its own namespace), once the handshake names it.
        self._remote: list[kvferry.RemoteTier] = []
        # Ranks that uploaded each block; all of them: announced as stored in the shared tier.
        self._uploaded: dict[bytes, set[int]] = {}

    # Lookups.

    def matched_tokens(self, request: Any, num_computed: int) -> tuple[int | None, bool]:
        rid = request.request_id
        params = request.kv_transfer_params or {}
        if self.cfg.pd and params.get("do_remote_prefill") and all(k in params for k in _REMOTE_KEYS):
            remote_tokens = int(params.get("remote_num_tokens") or request.num_prompt_tokens)
            n = min(remote_tokens, request.num_prompt_tokens) - num_computed
            if n > 0:
                self._matches[rid] = _Match("remote", num_computed, n)
                return n, True
            return 0, False
        if self.offload:
            keys = self._request_keys(request)
            start = num_computed // self.block_tokens
            hits = 0
            for key in keys[start:]:
                if self._medium(key) is None:
                    break
                hits += 1
            rest = keys[start + hits :]
            if self._remote and rest:
                # Every rank holds its own slice of a block: a block is a hit when all have it.
                found = [tier.lookup(rest) for tier in self._remote]
                if None in found:
                    # Asked in the background; vLLM asks again at a later step.
                    return None, False
                hits += min(found)
            n = (start + hits) * self.block_tokens - num_computed
            if n > 0:
                self._matches[rid] = _Match("tier", num_computed, n)
                return n, True
        return 0, False

    def hit_sources(self, request: Any, num_external: int) -> dict[Any, int]:
        match = self._matches.get(request.request_id)
        if num_external == 0 or match is None:
            return {}
        if match.kind == "remote":
            return {CacheHitSource.P2P: num_external}
        keys = self._request_keys(request)
        first = match.num_computed // self.block_tokens
        counts: dict[Any, int] = {}
        for key in keys[first : first + num_external // self.block_tokens]:
            medium = self._medium(key)
            if medium is None:
                source = CacheHitSource.EXTERNAL_UNSPECIFIED
            else:
                source = CacheHitSource.DISK if medium == "DISK" else CacheHitSource.HOST
            counts[source] = counts.get(source, 0) + self.block_tokens
        return counts

    def after_alloc(self, request: Any, blocks: Any, num_external: int) -> None:
        rid = request.request_id
        if self.offload:
            self._requests[rid] = request
        # Kept until the request ends: vLLM asks for the hit sources after this.
        match = self._matches.get(rid)
        params = request.kv_transfer_params
        if self.cfg.pd and params and params.get("do_remote_prefill"):
            # Processed once: a second call after the load must not start another.
            params["do_remote_prefill"] = False
            if not all(k in params for k in _REMOTE_KEYS):
                logger.warning("kvferry: %s has incomplete kv_transfer_params %s", rid, params)
                return
            local_ids = remote_ids = [[] for _ in range(self.groups)]
            if num_external > 0 and match is not None and match.kind == "remote":
                first = match.num_computed // self.block_tokens
                last = -(-(match.num_computed + num_external) // self.block_tokens)
                remote_all = params["remote_block_ids"]
                if remote_all and not isinstance(remote_all[0], (list, tuple)):
                    remote_all = [remote_all]
                local_ids = [g[first:last] for g in self._held_ids(blocks.get_block_ids())]
                remote_ids = [list(g[first:last]) for g in remote_all]
                self._loading.add(rid)
            # With nothing to read the load still tells the prefill engine to release the blocks.
            self._step.remote_loads.append(
                RemoteLoad(
                    rid,
                    local_ids,
                    remote_ids,
                    str(params["remote_engine_id"]),
                    str(params["remote_request_id"]),
                    str(params["remote_host"]),
                    int(params["remote_port"]),
                )
            )
            return
        if num_external > 0 and match is not None and match.kind == "tier":
            first = match.num_computed // self.block_tokens
            count = num_external // self.block_tokens
            groups = self._held_ids(blocks.get_block_ids())
            ids = [[g[i] for g in groups] for i in range(first, first + count)]
            keys = self._request_keys(request)[first : first + count]
            self._step.tier_loads.append(TierLoad(rid, ids, keys))
            self._loading.add(rid)

    # Each step.

    def build_meta(self, out: Any) -> StepMetadata:
        meta, self._step = self._step, StepMetadata()
        meta.idle = out.total_num_scheduled_tokens == 0
        meta.preempted = set(out.preempted_req_ids or ())
        for rid in meta.preempted:
            self._stored_upto.pop(rid, None)
        if self.offload:
            computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
            cached = out.scheduled_cached_reqs
            computed.update(zip(cached.req_ids, cached.num_computed_tokens))
            for rid, num_computed in computed.items():
                spec = self._stores_for(rid, num_computed + out.num_scheduled_tokens.get(rid, 0))
                if spec is not None:
                    meta.stores.append(spec)
        return meta

    def _stores_for(self, rid: str, tokens_after_step: int) -> TierSave | None:
        request = self._requests.get(rid)
        if request is None or self.kv_cache_manager is None:
            return None
        keys = self._request_keys(request)
        upto = min(tokens_after_step // self.block_tokens, len(keys))
        start = self._stored_upto.get(rid, 0)
        if upto <= start:
            return None
        self._stored_upto[rid] = upto
        groups = self._held_ids(self.kv_cache_manager.get_block_ids(rid))
        ids, chosen = [], []
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(start, upto):
            key = keys[i]
            if self._medium(key) is not None or key in self._pending:
                continue
            block = [g[i] if i < len(g) else None for g in groups]
            if None in block:
                # A sliding window gave this block back (a prefix this engine had cached
                # starts past it): the tokens are stored whole or not at all.
                continue
            self._pending[key] = _Pending(
                maybe_convert_block_hash(hashes[i]),
                maybe_convert_block_hash(hashes[i - 1]) if i else None,
                list(tokens[i * self.block_tokens : (i + 1) * self.block_tokens]),
            )
            ids.append(block)
            chosen.append(key)
        if not chosen:
            return None
        self._storing.add(rid)
        return TierSave(rid, ids, chosen)

    def finished(self, request: Any, block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._requests.pop(rid, None)
        self._keys.pop(rid, None)
        self._stored_upto.pop(rid, None)
        self._matches.pop(rid, None)
        if rid in self._loading:
            # vLLM frees the blocks only once the worker says the load ended; make that soon.
            self._step.cancelled_loads.add(rid)
        hold = rid in self._storing
        self._storing.discard(rid)
        expiry, params = None, None
        kv_params = request.kv_transfer_params or {}
        if (
            self.cfg.pd
            and kv_params.get("do_remote_decode")
            and request.status in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
            and any(block_ids)
        ):
            if self.server is None:
                logger.warning("kvferry: %s asks for remote decode but the side channel is not up", rid)
            else:
                expiry = time.time() + self.cfg.lease_seconds
                params = {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    "remote_block_ids": self._held_ids(block_ids),
                    "remote_engine_id": self.cfg.engine_id,
                    "remote_request_id": rid,
                    "remote_host": self.server.host,
                    "remote_port": self.server.port,
                    "remote_num_tokens": request.num_computed_tokens,
                    "tp_size": self.tp_size,
                }
                hold = True
        if hold:
            self._step.held[rid] = expiry
        return hold, params

    def update(self, output: Any) -> None:
        for rid in output.finished_recving or ():
            self._loading.discard(rid)
        report = output.kv_connector_worker_meta
        if isinstance(report, WorkerReport):
            self._apply(report.tier_events)
            if report.failed_keys:
                for tier in self._remote:
                    tier.forget(report.failed_keys)

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    def reset(self) -> bool:
        if not self.offload:
            return False
        self._step.clear_tiers = True
        self._index.clear()
        self._hashes.clear()
        self._events.append(ev.AllBlocksCleared())
        return True

    def serve_handshake(self, ranks: dict[int, Any]) -> None:
        shakes = {r: m for r, m in ranks.items() if isinstance(m, RankHandshake)}
        if self.offload:
            self._restore({r: m.persisted for r, m in shakes.items()})
            remote = [shakes[r] for r in sorted(shakes) if shakes[r].remote is not None]
            if remote and len(remote) == self.tp_size:
                self._remote = [kvferry.RemoteTier(m.block_bytes, m.remote) for m in remote]
                logger.info("kvferry: remote tier %s for %d ranks", self._remote[0].location, len(self._remote))
            elif remote:
                logger.warning("kvferry: %d of %d ranks have a remote tier: not looking blocks up there", len(remote), self.tp_size)
        if not self.cfg.pd:
            return
        infos = {r: RankInfo.from_dict(m.info) for r, m in shakes.items() if m.info is not None}
        if len(infos) != self.tp_size:
            logger.warning("kvferry: %d of %d ranks sent handshake metadata", len(infos), self.tp_size)
        self.server = HandshakeServer(self.cfg.host, self.cfg.port, infos, self.cfg.auth_kwargs())
        logger.info("kvferry: side channel of %s on %s:%d", self.cfg.engine_id, self.server.host, self.server.port)

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()

    # Index of the tiers.

    def _restore(self, persisted: dict[int, list[bytes]]) -> None:
        """Start the index with the blocks the ranks' disk tiers kept from an earlier engine: their
        keys are the block hashes that engine computed, found again by a restarted engine that
        hashes the same tokens to the same values (vLLM's sha256 hashes do; its xxhash ones only
        with one PYTHONHASHSEED for both)."""
        count = sum(map(len, persisted.values()))
        if count == 0:
            return
        if self.hash_algo.startswith("xxhash") and os.environ.get("PYTHONHASHSEED") is None:
            logger.warning(
                "kvferry: %s block hashes are random per process without PYTHONHASHSEED: the %d blocks "
                "on disk from an earlier engine will not be found again",
                self.hash_algo,
                count,
            )
        # Published as vLLM's BlockStored like any store, with the hash alone: the index log keeps
        # neither the parent hash nor the tokens.
        restored = {key for keys in persisted.values() for key in keys}
        for key in restored:
            self._pending.setdefault(key, _Pending(maybe_convert_block_hash(key), None, []))
        self._apply([(rank, "stored", keys, "DISK", None) for rank, keys in persisted.items()])
        for key in restored:
            # A block not on every rank is not found: it must not look as if it were being stored.
            if self._medium(key) is None:
                self._pending.pop(key, None)
        found = sum(self._medium(key) is not None for key in restored)
        logger.info("kvferry: %d blocks found on disk from an earlier engine", found)

    def _held_ids(self, groups: Any) -> list[list[int | None]]:
        """Each group's block ids, None where the group holds no block: vLLM's null block, in place
        of the blocks a sliding window gave back."""
        null = self.kv_cache_manager.block_pool.null_block.block_id
        return [[None if b == null else b for b in g] for g in groups]

    def _request_keys(self, request: Any) -> list[bytes]:
        """The request's store keys; only blocks hashed since the last call are converted."""
        keys = self._keys.setdefault(request.request_id, [])
        hashes = request.block_hashes
        keys.extend(kvferry.engine_key(h) for h in hashes[len(keys) :])
        return keys

    def _medium(self, key: bytes) -> str | None:
        ranks = self._index.get(key)
        if ranks is None or len(ranks) < self.tp_size:
            return None
        return max(ranks.values(), key=_MEDIUM_ORDER.__getitem__)

    def _apply(self, events: list[tuple[int, str, list[bytes], str | None, str | None]]) -> None:
        # A "cleared" event names no key: the "removed" events before it named every block the
        # rank's clear forgot, and reset() has published vLLM's AllBlocksCleared already.
        for rank, kind, keys, medium, _from in events:
            if medium == _REMOTE:
                self._announce_uploads(rank, keys)
                continue
            for key in keys:
                before = self._medium(key)
                ranks = self._index.setdefault(key, {})
                if kind == "removed":
                    ranks.pop(rank, None)
                    if not ranks:
                        del self._index[key]
                else:
                    ranks[rank] = medium
                after = self._medium(key)
                if before == after:
                    continue
                pending = self._pending.pop(key, None) if after is not None else None
                if pending is not None:
                    self._hashes[key] = pending
                info = self._hashes.get(key)
                if info is None:
                    continue
                if before is not None:
                    self._events.append(ev.BlockRemoved(block_hashes=[info.engine_hash], medium=_VLLM_MEDIUM[before]))
                if after is None:
                    self._hashes.pop(key, None)
                else:
                    self._events.append(self._stored_event(info, after))

    def _announce_uploads(self, rank: int, keys: list[bytes]) -> None:
        """Blocks that every rank has uploaded are in the shared tier: vLLM's BlockStored with the
        STORAGE medium and the REMOTE locality, for routers of other engines."""
        if len(self._uploaded) > _MAX_UPLOADS_TRACKED:
            # Blocks some rank never uploaded (its budget dropped them) are forgotten, not kept forever.
            self._uploaded.clear()
        for key in keys:
            ranks = self._uploaded.setdefault(key, set())
            ranks.add(rank)
            if len(ranks) < self.tp_size:
                continue
            del self._uploaded[key]
            info = self._hashes.get(key) or self._pending.get(key)
            if info is None:
                continue
            self._events.append(self._stored_event(info, _REMOTE, locality="REMOTE"))

    def _stored_event(self, info: _Pending, medium: str, **locality: str) -> Any:
        """vLLM's BlockStored of one block in `medium` (kvferry's name), with `locality` if given."""
        return ev.BlockStored(
            block_hashes=[info.engine_hash],
            parent_block_hash=info.parent_hash,
            token_ids=info.token_ids,
            block_size=self.block_tokens,
            lora_id=None,
            medium=_VLLM_MEDIUM[medium],
            lora_name=None,
            **locality,
        )
