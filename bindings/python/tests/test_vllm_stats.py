"""The connector's stats in vLLM's own pipeline, in this process: real agents and a real tier store
count, each report holds what they counted since the last one, vLLM's worker aggregator sums two
ranks, vLLM's logging reduces the sum, and vLLM's Prometheus hook adds it to counters.

They need vLLM; without it they skip, saying why, unless KVFERRY_REQUIRE_VLLM=1."""

import functools
import os
import types

import numpy as np
import pytest

import kvferry
from conftest import link_whole, pattern

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
except ImportError as e:
    if os.environ.get("KVFERRY_REQUIRE_VLLM") == "1":
        raise
    pytest.skip(f"vLLM is not importable here ({e}); the stats tests run where it is", allow_module_level=True)

from kvferry.vllm.connector import KvferryConnector
from kvferry.vllm.stats import COUNTERS, KvferryConnectorStats, StatsReader

BLOCK = 4096
KTC = KVTransferConfig(kv_connector="KvferryConnector", kv_connector_module_path="kvferry.vllm", kv_role="kv_both")


def read(a, b, nbytes: int, seed: int):
    """a reads nbytes from b; returns the bytes a transfer moved by its own count."""
    source, dest = pattern(nbytes, seed), np.zeros(nbytes, np.uint8)
    regs = link_whole(a, b, dest, source)
    t = a.read(regs[2], [0], regs[3], [0])
    t.wait(10)
    assert np.array_equal(source, dest)
    return t.bytes


def test_reports_hold_what_the_agent_moved_since_the_last_report(pair):
    a, b = pair()
    reader = StatsReader()
    assert reader.report(a, None) is None  # nothing moved yet
    moved = read(a, b, 3 * BLOCK, 1)
    assert moved == 3 * BLOCK
    first = reader.report(a, None)
    (label,) = first.data["transfer_bytes"]
    assert label.endswith("/read") and first.data["transfer_bytes"][label] == moved
    assert first.data["transfers"] == {label: 1} and first.data["transfer_failures"] == {}
    assert 0 < first.data["transfer_seconds"][label] < 10
    # The agent's own counters agree.
    (series,) = [s for s in a.stats() if f"{s['transport']}/{s['direction']}" == label]
    assert series["bytes"] == moved and series["transfers"] == 1
    assert sum(series["duration_buckets"]) == 1 and len(series["duration_buckets"]) == len(kvferry.TRANSFER_DURATION_BUCKETS) + 1
    assert reader.report(a, None) is None  # already reported
    read(a, b, 5 * BLOCK, 2)
    assert reader.report(a, None).data["transfer_bytes"] == {label: 5 * BLOCK}


def test_a_failed_transfer_and_a_failed_load_are_counted(pair):
    a, b = pair(shm=False)
    reader = StatsReader()
    regs = link_whole(a, b, np.zeros(BLOCK, np.uint8), pattern(BLOCK, 4))
    b.close()  # the peer is gone when the read runs
    with pytest.raises(kvferry.TransferError, match="PeerUnreachable"):
        a.read(regs[2], [0], regs[3], [0]).wait(10)
    reader.load_failures += 1  # what the worker adds when it reports a failed load to vLLM
    report = reader.report(a, None)
    assert report.data["transfer_failures"] == {"tcp/read": 1} and report.data["transfer_bytes"] == {}
    assert report.data["load_failures"] == 1
    assert reader.report(a, None) is None


def test_tier_hits_are_reported_by_medium(tmp_path):
    count = 8
    keys = [kvferry.engine_key(i) for i in range(count)]
    source, dest = pattern(count * BLOCK, 3), np.zeros(count * BLOCK, np.uint8)
    reader = StatsReader()
    with kvferry.TierStore(BLOCK, 4 * BLOCK, disk_dir=tmp_path, disk_capacity=32 * BLOCK) as store:
        blocks = [(k, [(source.ctypes.data + i * BLOCK, BLOCK)]) for i, k in enumerate(keys)]
        for start in range(0, count, 4):
            store.put(blocks[start : start + 4]).wait(10)
        media = store.lookup(keys)
        before = store.stats()
        assert reader.report(None, store) is None  # puts hit nothing
        for start in range(0, count, 4):
            store.get([(k, [(dest.ctypes.data + i * BLOCK, BLOCK)]) for i, k in enumerate(keys)][start : start + 4]).wait(10)
        assert np.array_equal(source, dest)
        after = store.stats()
        report = reader.report(None, store)
    hits = report.data["tier_hits"]
    assert hits == {
        m: after[s] - before[s] for m, s in (("CPU", "host_hits"), ("DISK", "disk_hits")) if after[s] - before[s]
    }
    # Blocks read from disk go back to DRAM, pushing others down: at least those on disk first.
    assert hits.get("DISK", 0) >= media.count("DISK") > 0 and sum(hits.values()) == count


def _stats(**data) -> KvferryConnectorStats:
    stats = KvferryConnectorStats()
    for key, value in data.items():
        stats.data[key] = value
    return stats


def _output(stats):
    return ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=KVConnectorOutput(kv_connector_stats=stats))


def test_vllm_sums_the_ranks_logs_and_exports_the_counters():
    rank0 = _stats(transfer_bytes={"shm/read": 1000}, transfers={"shm/read": 2}, transfer_seconds={"shm/read": 0.5},
                   tier_hits={"CPU": 3}, load_failures=1)  # fmt: skip
    rank1 = _stats(transfer_bytes={"shm/read": 24, "tcp/read": 8}, transfers={"shm/read": 1, "tcp/read": 1},
                   transfer_failures={"tcp/read": 1}, transfer_seconds={"shm/read": 0.25, "tcp/read": 0.25},
                   tier_hits={"CPU": 1, "DISK": 2}, tier_misses=1)  # fmt: skip
    # vLLM's worker-side aggregation, as the executor runs it over its ranks' outputs.
    summed = KVOutputAggregator(2).aggregate([_output(rank0), _output(rank1)]).kv_connector_output.kv_connector_stats
    assert isinstance(summed, KvferryConnectorStats)
    data = summed.to_dict()
    assert data["transfer_bytes"] == {"shm/read": 1024, "tcp/read": 8}
    assert data["transfers"] == {"shm/read": 3, "tcp/read": 1} and data["transfer_failures"] == {"tcp/read": 1}
    assert data["tier_hits"] == {"CPU": 4, "DISK": 2} and data["tier_misses"] == 1 and data["load_failures"] == 1
    # The logger rebuilds the stats from the dict through the connector class vLLM loads by path.
    logging = KVConnectorLogging(KTC)
    assert logging.connector_cls is KvferryConnector
    logging.observe(data)
    logging.observe(_stats(transfer_bytes={"shm/read": 1024}, transfers={"shm/read": 1}).to_dict())
    lines = []
    logging.log(lambda fmt, *args: lines.append(fmt % args))
    (line,) = lines
    for part in ("Transfers=5", "Failed transfers=1", "MB moved=0.002", "Avg transfer time (ms)=166.667",
                 "DRAM hits=4", "Disk hits=2", "Tier misses=1", "Failed loads=1"):  # fmt: skip
        assert part in line, line
    # The Prometheus hook, on a registry of this test's own.
    registry = CollectorRegistry()

    class Prom(KVConnectorProm):
        _gauge_cls = functools.partial(Gauge, registry=registry)
        _counter_cls = functools.partial(Counter, registry=registry)
        _histogram_cls = functools.partial(Histogram, registry=registry)

    prom = Prom(types.SimpleNamespace(kv_transfer_config=KTC), ["model_name", "engine"], {0: ["m", "0"]})
    assert prom.prom_metrics is not None
    prom.observe(data, 0)
    prom.observe(_stats(transfer_bytes={"shm/read": 1}).to_dict(), 0)
    engine = {"model_name": "m", "engine": "0"}

    def value(name, **labels):
        return registry.get_sample_value(f"vllm:kvferry_{name}_total", {**engine, **labels})

    assert value("transfer_bytes", transport="shm", direction="read") == 1025
    assert value("transfer_bytes", transport="tcp", direction="read") == 8
    assert value("transfers", transport="shm", direction="read") == 3
    assert value("transfer_failures", transport="tcp", direction="read") == 1
    assert value("transfer_seconds", transport="shm", direction="read") == 0.75
    assert value("tier_hits", medium="CPU") == 4 and value("tier_hits", medium="DISK") == 2
    assert value("tier_misses") == 1 and value("load_failures") == 1
    # Every counter of the one list is on the registry.
    names = {m.name for m in registry.collect()}
    assert {name.removesuffix("_total") for name, _, _ in COUNTERS.values()} <= names


def test_empty_reset_and_the_connector_hooks():
    assert KvferryConnector.build_kv_connector_stats().is_empty()
    stats = KvferryConnector.build_kv_connector_stats({"transfer_bytes": {"shm/read": 1}})
    assert isinstance(stats, KvferryConnectorStats) and not stats.is_empty()
    stats.reset()
    assert stats.is_empty() and set(stats.data) == set(COUNTERS)
    assert KvferryConnectorStats().aggregate(_stats(tier_misses=2)).data["tier_misses"] == 2
    # Hooks vLLM calls by name: defined here, not inherited (the base's return None).
    for hook in ("get_kv_connector_stats", "build_kv_connector_stats", "build_prom_metrics"):
        assert hook in KvferryConnector.__dict__, hook
