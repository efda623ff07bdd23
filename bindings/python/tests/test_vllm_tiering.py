"""kvferry's disk tier as a secondary tier of vLLM's tiered offloading, driven by vLLM's own
`TieringOffloadingSpec` and `TieringOffloadingManager` in this process, over vLLM's real primary CPU
region (a /dev/shm mapping): stores, lookups, promotions and events round-trip byte for byte, and
damaged, cleared or oversized blocks fail their jobs instead of serving wrong bytes.

They need vLLM; without it they skip, saying why, unless KVFERRY_REQUIRE_VLLM=1."""

import os
import time
import uuid

import numpy as np
import pytest

import kvferry
from conftest import pattern

try:
    from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key
    from vllm.v1.kv_offload.config import (
        OffloadingCacheConfig,
        OffloadingConfig,
        OffloadingGroupConfig,
        OffloadingModelConfig,
        OffloadingParallelConfig,
    )
    from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec
except ImportError as e:
    if os.environ.get("KVFERRY_REQUIRE_VLLM") == "1":
        raise
    pytest.skip(f"vLLM is not importable here ({e}); the tiering tests run where it is", allow_module_level=True)

from kvferry.vllm.tiering import KvferryTier, block_key

# One primary row (chunk) per block: vLLM rounds rows to whole pages, as O_DIRECT needs.
ROW = 8192
PRIMARY_ROWS = 8


def tier_config(root, disk_blocks: int) -> dict:
    return {
        "type": "KvferryTier",
        "module_path": "kvferry.vllm.tiering",
        "root_dir": str(root),
        "disk_bytes": disk_blocks * ROW,
        "enable_kv_events": True,
    }


def make_manager(root, disk_blocks: int = 64):
    """vLLM's tiering manager with kvferry as its secondary tier, loaded by the factory through
    module_path from the same settings an engine's kv_connector_extra_config carries."""
    config = OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("layer.0",), group_id=0),),
        worker_kv_bytes_per_block=ROW,
        enable_kv_cache_events=True,
        extra_config={"cpu_bytes_to_use": PRIMARY_ROWS * ROW, "secondary_tiers": [tier_config(root, disk_blocks)]},
        engine_id=f"kvferry-test-{uuid.uuid4().hex[:12]}",
        model=OffloadingModelConfig(name="kvferry/tiny", dtype="float16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0,
            world_size=1,
            tp_size=1,
            pp_size=1,
            pcp_size=1,
            dcp_size=1,
            data_parallel_index=0,
            data_parallel_size=1,
            data_parallel_rank_local=None,
            is_parallelism_agnostic=False,
        ),
    )
    spec = TieringOffloadingSpec(config)
    return spec.get_manager()


@pytest.fixture
def managers():
    made = []

    def make(root, disk_blocks: int = 64):
        manager = make_manager(root, disk_blocks)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown()


def keys_for(start: int, count: int):
    # vLLM's offload keys: a 32-byte block hash and the group index (36 bytes in all).
    return [make_offload_key(i.to_bytes(32, "big"), 0) for i in range(start, start + count)]


def rows(manager) -> np.ndarray:
    return np.asarray(manager.primary_tier.get_kv_memoryview())


def step(manager):
    manager.on_schedule_end(ScheduleEndContext(new_req_ids=(), preempted_req_ids=()))


def settle(manager, timeout: float = 30):
    """Step until no transfer job between the tiers is in flight."""
    deadline = time.monotonic() + timeout
    step(manager)
    while manager.has_pending_work():
        assert time.monotonic() < deadline, "tier jobs did not finish"
        time.sleep(0.005)
        step(manager)


def offload(manager, ctx, keys, seed: int) -> dict:
    """What a GPU→CPU store does: rows prepared, filled, completed (which cascades to the tier).
    Returns each key's bytes."""
    prepared = manager.prepare_store(keys, ctx)
    assert prepared is not None and list(prepared.keys_to_store) == list(keys)
    written = {}
    view = rows(manager)
    for n, (key, chunk) in enumerate(zip(prepared.keys_to_store, prepared.store_spec.chunk_ids)):
        view[chunk] = pattern(ROW, seed + n)
        written[key] = view[chunk].copy()
    manager.complete_store(keys, ctx)
    return written


def promote(manager, ctx, keys) -> list[LookupResult]:
    """Look the keys up (a primary miss starts a promotion from the tier), then step until the
    promotions end; returns the lookups after."""
    first = [manager.lookup(key, ctx) for key in keys]
    assert first == [LookupResult.HIT_PENDING] * len(keys), first
    settle(manager)
    return [manager.lookup(key, ctx) for key in keys]


def read_primary(manager, ctx, keys) -> list[np.ndarray]:
    spec = manager.prepare_load(keys, ctx)
    view = rows(manager)
    out = [view[chunk].copy() for chunk in spec.chunk_ids]
    manager.complete_load(keys, ctx)
    return out


def tier_of(manager) -> KvferryTier:
    (tier,) = manager.secondary_tiers
    return tier


def block_file(tier) -> str:
    return os.path.join(tier.disk_dir, "blocks.kvf")


def test_the_factory_loads_the_tier_by_module_path(tmp_path, managers):
    manager = managers(tmp_path)
    tier = tier_of(manager)
    assert isinstance(tier, KvferryTier) and tier.tier_type == "KvferryTier"
    assert tier.block_size_bytes == ROW
    # Namespaced by model and layout, as vLLM's file system tier is, with its run config beside.
    assert os.path.dirname(tier.disk_dir) == str(tmp_path) and "kvferry_tiny" in tier.disk_dir
    assert os.path.exists(os.path.join(tier.disk_dir, "config.json"))
    assert os.path.getsize(block_file(tier)) == 64 * ROW
    definitions = KvferryTier.build_metric_definitions(tier_config(tmp_path, 64))
    assert "vllm:kv_offload_kvferry_disk_blocks" in definitions


def test_stores_lookups_loads_and_events_round_trip_byte_exact(tmp_path, managers):
    manager = managers(tmp_path)
    tier = tier_of(manager)
    ctx = ReqContext(req_id="a")
    manager.on_new_request(ctx)
    keys = keys_for(0, 4)
    written = offload(manager, ctx, keys, seed=100)
    settle(manager)
    assert [tier.lookup(key, ctx) for key in keys] == [LookupResult.HIT] * 4
    assert tier.lookup(keys_for(50, 1)[0], ctx) == LookupResult.MISS
    events = list(manager.take_events())
    tier_events = [e for e in events if e.ownership == "kvferry"]
    assert [(e.medium.value, e.removed) for e in tier_events] == [("STORAGE", False)]
    assert tier_events[0].keys == keys
    # The bytes on disk are the rows' bytes, in the slots the store handed out in order.
    with open(block_file(tier), "rb") as f:
        on_disk = f.read(4 * ROW)
    assert on_disk == b"".join(written[k].tobytes() for k in keys)

    # The primary tier forgets everything; the blocks come back from kvferry into fresh rows.
    manager.reset_cache()
    rows(manager)[:] = 0
    assert promote(manager, ctx, keys) == [LookupResult.HIT] * 4
    for key, got in zip(keys, read_primary(manager, ctx, keys)):
        assert np.array_equal(got, written[key])

    stats = manager.get_stats().data["data"]
    label = ("KvferryTier",)
    assert stats["vllm:kv_offload_kvferry_disk_writes"][label] == 4
    assert stats["vllm:kv_offload_kvferry_disk_hits"][label] == 4
    assert stats["vllm:kv_offload_kvferry_disk_blocks"][label] == 4
    assert "vllm:kv_offload_kvferry_failed_loads" not in stats
    # Counters report what happened since the last call.
    again = tier.get_stats().data["data"]
    assert "vllm:kv_offload_kvferry_disk_writes" not in again
    assert again["vllm:kv_offload_kvferry_disk_blocks"][label] == 4
    manager.on_request_finished(ctx)


def test_a_flipped_byte_in_the_block_file_fails_the_load_and_serves_nothing(tmp_path, managers):
    manager = managers(tmp_path)
    tier = tier_of(manager)
    ctx = ReqContext(req_id="b")
    manager.on_new_request(ctx)
    keys = keys_for(10, 2)
    offload(manager, ctx, keys, seed=200)
    settle(manager)
    list(manager.take_events())
    # The second block (slot 1) loses one bit.
    with open(block_file(tier), "r+b") as f:
        f.seek(ROW + 1234)
        byte = f.read(1)[0]
        f.seek(ROW + 1234)
        f.write(bytes([byte ^ 0x10]))
    manager.reset_cache()
    assert promote(manager, ctx, keys[1:]) == [LookupResult.MISS]
    # The damaged block is gone from the tier (reported as removed); the other is intact.
    assert tier.lookup(keys[1], ctx) == LookupResult.MISS
    assert [(e.keys, e.removed) for e in manager.take_events() if e.ownership == "kvferry"] == [([keys[1]], True)]
    stats = tier.get_stats().data["data"]
    assert stats["vllm:kv_offload_kvferry_corrupt_blocks"][("KvferryTier",)] == 1
    assert stats["vllm:kv_offload_kvferry_failed_loads"][("KvferryTier",)] == 1
    assert promote(manager, ctx, keys[:1]) == [LookupResult.HIT]
    manager.on_request_finished(ctx)


def test_a_block_cleared_before_its_load_fails_cleanly(tmp_path, managers):
    manager = managers(tmp_path)
    tier = tier_of(manager)
    ctx = ReqContext(req_id="c")
    manager.on_new_request(ctx)
    keys = keys_for(20, 3)
    offload(manager, ctx, keys, seed=300)
    settle(manager)
    manager.reset_cache()
    # The lookup finds the blocks and queues their promotion; the tier loses them before the
    # promotion is submitted at the end of the step.
    assert [manager.lookup(key, ctx) for key in keys] == [LookupResult.HIT_PENDING] * 3
    tier._store.clear()
    settle(manager)
    assert [manager.lookup(key, ctx) for key in keys] == [LookupResult.MISS] * 3
    assert tier.get_stats().data["data"]["vllm:kv_offload_kvferry_failed_loads"][("KvferryTier",)] == 1
    manager.on_request_finished(ctx)


def test_a_store_larger_than_the_disk_fails_and_nothing_is_served(tmp_path, managers):
    manager = managers(tmp_path, disk_blocks=2)
    tier = tier_of(manager)
    ctx = ReqContext(req_id="d")
    manager.on_new_request(ctx)
    keys = keys_for(30, 3)
    written = offload(manager, ctx, keys, seed=400)
    settle(manager)
    assert [tier.lookup(key, ctx) for key in keys] == [LookupResult.MISS] * 3
    assert tier.get_stats().data["data"]["vllm:kv_offload_kvferry_failed_stores"][("KvferryTier",)] == 1
    assert not [e for e in manager.take_events() if e.ownership == "kvferry"]
    # The primary tier still serves its copies; once it forgets them, nothing does.
    for key, got in zip(keys, read_primary(manager, ctx, keys)):
        assert np.array_equal(got, written[key])
    manager.reset_cache()
    assert [manager.lookup(key, ctx) for key in keys] == [LookupResult.MISS] * 3
    # A store that fits still goes through.
    fits = keys_for(40, 2)
    offload(manager, ctx, fits, seed=500)
    settle(manager)
    assert [tier.lookup(key, ctx) for key in fits] == [LookupResult.HIT] * 2
    manager.on_request_finished(ctx)


def test_blocks_on_disk_are_found_after_the_tier_is_recreated(tmp_path, managers):
    first = make_manager(tmp_path)
    ctx = ReqContext(req_id="e")
    first.on_new_request(ctx)
    keys = keys_for(60, 3)
    written = offload(first, ctx, keys, seed=600)
    settle(first)
    first.on_request_finished(ctx)
    # A second tier on the directory is refused while the first holds it.
    with pytest.raises(kvferry.TierError) as refused:
        make_manager(tmp_path)
    assert refused.value.code_name == "TierDiskLocked"
    first.shutdown()

    second = managers(tmp_path)
    ctx = ReqContext(req_id="f")
    second.on_new_request(ctx)
    assert [tier_of(second).lookup(key, ctx) for key in keys] == [LookupResult.HIT] * 3
    assert promote(second, ctx, keys) == [LookupResult.HIT] * 3
    for key, got in zip(keys, read_primary(second, ctx, keys)):
        assert np.array_equal(got, written[key])
    second.on_request_finished(ctx)


def test_long_keys_fold_to_distinct_store_keys():
    long_keys = keys_for(0, 2)
    assert len(long_keys[0]) == 36
    folded = [block_key(k) for k in long_keys]
    assert all(len(k) == 32 for k in folded) and folded[0] != folded[1]
    short = make_offload_key((7).to_bytes(8, "big"), 1)
    assert block_key(short) == short
