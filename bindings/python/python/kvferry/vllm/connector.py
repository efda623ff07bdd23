"""`KvferryConnector`: vLLM's KV connector for P/D disaggregation, tier offload, or both at once."""

from __future__ import annotations

from typing import Any, Iterable

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvferry.vllm.config import ConnectorConfig
from kvferry.vllm.metadata import StepMetadata
from kvferry.vllm.stats import KvferryConnectorStats, KvferryPromMetrics


class KvferryConnector(KVConnectorBase_V1, SupportsHMA):
    """Load with `--kv-transfer-config '{"kv_connector": "KvferryConnector",
    "kv_connector_module_path": "kvferry.vllm", "kv_role": "kv_both", "kv_connector_extra_config": {...}}'`.

    `kv_connector_extra_config`: `pd` (default on for any kv_role), `offload`
    (`{"dram_gib": 4, "disk_dir": "/nvme/kv", "disk_gib": 100}`; a restarted engine finds what the
    disk kept unless `"clear_on_start": true`), `host`, `port`, `lease_seconds`,
    `timeout_seconds`, `shm`, `fabric_provider`. See docs/vllm.md.
    """

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any):
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.config = ConnectorConfig.from_extra(ktc.engine_id, ktc.kv_role, ktc.kv_connector_extra_config)
        self._scheduler = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from kvferry.vllm.scheduler import ConnectorScheduler

            self._scheduler = ConnectorScheduler(self.config, vllm_config, kv_cache_config)
        else:
            from kvferry.vllm.worker import ConnectorWorker

            self._worker = ConnectorWorker(self.config, vllm_config, kv_cache_config)

    # Scheduler side.

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        assert self._scheduler is not None
        self._scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        assert self._scheduler is not None
        return self._scheduler.hit_sources(request, num_external_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        self._scheduler.update(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request, block_ids)

    def take_events(self) -> Iterable[Any]:
        assert self._scheduler is not None
        return self._scheduler.take_events()

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        assert self._scheduler is not None
        self._scheduler.serve_handshake(metadata)

    def reset_cache(self) -> bool | None:
        return self._scheduler.reset() if self._scheduler is not None else None

    # Metrics: workers report kvferry's counters every step; vLLM sums the ranks' reports, logs
    # them and adds them to its Prometheus counters.

    def get_kv_connector_stats(self) -> KvferryConnectorStats | None:
        return self._worker.stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvferryConnectorStats | None:
        return KvferryConnectorStats() if data is None else KvferryConnectorStats.from_dict(data)

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KvferryPromMetrics | None:
        return KvferryPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # Sleep mode (vLLM 0.33 and later; 0.32 never calls these).

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        # The caches are deregistered before sleep and registered again after wake-up.
        return True

    def unregister_kv_caches(self) -> None:
        if self._worker is not None:
            self._worker.unregister_kv_caches()

    def restore_kv_caches(self) -> None:
        if self._worker is not None:
            self._worker.restore_kv_caches()

    # Worker side.

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._worker.handshake() if self._worker is not None else None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self._worker is not None and isinstance(kv_connector_metadata, StepMetadata)
        self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, StepMetadata)
        self._worker.start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads run between steps: a request is scheduled only after its blocks arrived.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        # Stores start in wait_for_save, once per step for all layers at once.
        return

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, StepMetadata)
        self._worker.save(meta)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        # Called inside a step, with its metadata bound; a caller outside one waits for nothing.
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        idle = isinstance(meta, StepMetadata) and meta.idle
        sending, recving, failed = self._worker.results(idle=idle)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending, results.finished_recving

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_error_blocks() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> Any:
        return self._worker.report() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()
