"""The connector's numbers in vLLM's stats pipeline: each worker reports what its agent and tier
store counted since its last report (`KvferryConnectorStats`), vLLM sums the workers' reports
(`aggregate`), logs them (`reduce`) and hands them to `KvferryPromMetrics`, which adds them to
counters on vLLM's `/metrics`.

Every number is a difference of kvferry's own counters (`Agent.stats()`, `TierStore.stats()`)
between two reports, or a load the worker saw fail; nothing is estimated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

# What a report holds, by key of `KvferryConnectorStats.data`: (the Prometheus counter it adds to,
# its help, the labels its entries are keyed by; none: one number). Transfers are keyed
# "transport/direction", tier hits by medium.
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "transfer_bytes": (
        "vllm:kvferry_transfer_bytes",
        "Bytes moved by kvferry's completed KV transfers.",
        ("transport", "direction"),
    ),
    "transfers": (
        "vllm:kvferry_transfers",
        "kvferry KV transfers completed successfully.",
        ("transport", "direction"),
    ),
    "transfer_failures": (
        "vllm:kvferry_transfer_failures",
        "kvferry KV transfers that failed.",
        ("transport", "direction"),
    ),
    "transfer_seconds": (
        "vllm:kvferry_transfer_seconds",
        "Time from post to end of kvferry's KV transfers, summed (divide by transfers and failures "
        "for the mean).",
        ("transport", "direction"),
    ),
    "tier_hits": (
        "vllm:kvferry_tier_hits",
        "KV blocks loaded from kvferry's tiers, by the medium they were in (CPU: DRAM, DISK, REMOTE: "
        "the tier every engine shares).",
        ("medium",),
    ),
    "tier_misses": (
        "vllm:kvferry_tier_misses",
        "KV blocks a tier load found in no tier (evicted after the lookup).",
        (),
    ),
    "remote": (
        "vllm:kvferry_remote",
        "What kvferry's remote tier did with blocks, by event: uploads, already_stored (not uploaded "
        "again), dropped (upload budget spent or breaker open), misses, errors (requests failed), corrupt "
        "and mismatched (objects refused).",
        ("event",),
    ),
    "load_failures": (
        "vllm:kvferry_load_failures",
        "KV loads (P/D pulls and tier loads) that failed and were reported to vLLM.",
        (),
    ),
}
# The `Agent.stats()` key each transfer counter is the difference of.
AGENT_SOURCES = {
    "transfer_bytes": "bytes",
    "transfers": "transfers",
    "transfer_failures": "failures",
    "transfer_seconds": "duration_seconds",
}
# The `TierStore.stats()` key of the hits in each medium, named as vLLM's KV events name media.
TIER_HITS = {"CPU": "host_hits", "DISK": "disk_hits"}
# The `TierStore.stats()["remote"]` counters the "remote" entry reports, by event.
REMOTE_EVENTS = ("uploads", "already_stored", "dropped", "misses", "errors", "corrupt", "mismatched")


def _empty() -> dict[str, Any]:
    return {key: {} if labels else 0 for key, (_, _, labels) in COUNTERS.items()}


@dataclass
class KvferryConnectorStats(KVConnectorStats):
    """Counts since the last report, of one worker or (aggregated) of several."""

    def __post_init__(self):
        if not self.data:
            self.reset()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KvferryConnectorStats":
        """A report rebuilt from its `to_dict()`, sharing nothing with it: vLLM hands the same dict
        to its log and its Prometheus loggers, and `aggregate` adds into the receiver."""
        return cls(data={k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()})

    def reset(self) -> None:
        self.data = _empty()

    def is_empty(self) -> bool:
        return not any(v for v in self.data.values())

    def aggregate(self, other: KVConnectorStats) -> "KvferryConnectorStats":
        for key, value in other.data.items():
            if isinstance(value, Mapping):
                mine = self.data.setdefault(key, {})
                for label, n in value.items():
                    mine[label] = mine.get(label, 0) + n
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        transfers = sum(d["transfers"].values())
        failures = sum(d["transfer_failures"].values())
        seconds = sum(d["transfer_seconds"].values())
        mb = sum(d["transfer_bytes"].values()) / 2**20
        settled = transfers + failures
        return {
            "Transfers": transfers,
            "Failed transfers": failures,
            "MB moved": round(mb, 3),
            "Avg transfer time (ms)": round(seconds / settled * 1e3, 3) if settled else 0,
            "Throughput (MB/s)": round(mb / seconds, 3) if seconds else 0,
            "DRAM hits": d["tier_hits"].get("CPU", 0),
            "Disk hits": d["tier_hits"].get("DISK", 0),
            "Remote hits": d["tier_hits"].get("REMOTE", 0),
            "Remote uploads": d["remote"].get("uploads", 0),
            "Tier misses": d["tier_misses"],
            "Failed loads": d["load_failures"],
        }


class StatsReader:
    """A worker's reports: what its agent and store counted since the previous report."""

    def __init__(self) -> None:
        self._agent: dict[str, dict[str, Any]] = {}
        self._store: dict[str, Any] = {}
        self.load_failures = 0

    def report(self, agent: Any, store: Any) -> KvferryConnectorStats | None:
        stats = KvferryConnectorStats()
        d = stats.data
        if agent is not None:
            for series in agent.stats():
                label = f"{series['transport']}/{series['direction']}"
                before = self._agent.get(label, {})
                for key, source in AGENT_SOURCES.items():
                    delta = series[source] - before.get(source, 0)
                    if delta:
                        d[key][label] = delta
                self._agent[label] = series
        if store is not None:
            now = store.stats()
            for medium, source in TIER_HITS.items():
                delta = now[source] - self._store.get(source, 0)
                if delta:
                    d["tier_hits"][medium] = delta
            d["tier_misses"] = now["misses"] - self._store.get("misses", 0)
            remote, before = now.get("remote"), self._store.get("remote") or {}
            if remote is not None:
                hits = remote["hits"] - before.get("hits", 0)
                if hits:
                    d["tier_hits"]["REMOTE"] = hits
                for event in REMOTE_EVENTS:
                    delta = remote[event] - before.get(event, 0)
                    if delta:
                        d["remote"][event] = delta
            self._store = now
        d["load_failures"], self.load_failures = self.load_failures, 0
        return None if stats.is_empty() else stats


class KvferryPromMetrics(KVConnectorPromMetrics):
    """One vLLM counter per entry of `COUNTERS`, labelled like vLLM's own metrics plus the entry's
    label (transport and direction, or medium)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            key: self._counter_cls(name=name, documentation=help, labelnames=[*labelnames, *labels])
            for key, (name, help, labels) in COUNTERS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = self.per_engine_labelvalues[engine_idx]
        for key, value in transfer_stats_data.items():
            counter = self.counters.get(key)
            if counter is None:
                continue
            if isinstance(value, Mapping):
                for label, n in value.items():
                    if n:
                        counter.labels(*engine, *str(label).split("/")).inc(n)
            elif value:
                counter.labels(*engine).inc(value)


__all__ = ["COUNTERS", "KvferryConnectorStats", "KvferryPromMetrics", "StatsReader"]
