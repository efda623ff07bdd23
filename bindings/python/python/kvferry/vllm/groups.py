"""Which of vLLM's KV cache groups the connector serves.

A group's blocks are served when each one holds the keys and values of a fixed run of tokens,
written once when computed: full attention (MLA included) and sliding windows. A sliding window
group gives its blocks before the window back while the request runs; vLLM puts its null block in
their place, which the connector never stores from nor loads into. Anything else (state-space
layers, ring buffers, cross attention, sparse caches) is refused at start rather than half served.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    MLAAttentionSpec,
    SlidingWindowMLASpec,
    SlidingWindowSpec,
)

# Exact types: subclasses of these (ring buffers, sink tokens, hidden states) keep other contents.
_FULL = (FullAttentionSpec, MLAAttentionSpec)
_WINDOWED = (SlidingWindowSpec, SlidingWindowMLASpec)


class UnsupportedGroup(ValueError):
    """A KV cache group whose blocks the connector cannot store, load or transfer."""


def _layer_specs(spec: Any) -> list[Any]:
    # A group of layers with specs of one type but different shapes carries a spec per layer.
    per_layer = getattr(spec, "kv_cache_specs", None)
    return list(per_layer.values()) if isinstance(per_layer, dict) else [spec]


def windowed_groups(kv_cache_config: Any, block_tokens: int) -> list[bool]:
    """For each KV cache group, whether it keeps a sliding window (and so gives blocks back while a
    request runs); raises `UnsupportedGroup` naming a group the connector cannot serve."""
    windowed = []
    for index, group in enumerate(kv_cache_config.kv_cache_groups):
        if not getattr(group, "enable_kv_transfer", True):
            raise UnsupportedGroup(
                f"kvferry: KV cache group {index} (layers {list(group.layer_names)}) is rebuilt by vLLM "
                "rather than transferred, which kvferry does not do; use another connector for this model"
            )
        kinds = set()
        for spec in _layer_specs(group.kv_cache_spec):
            if type(spec) in _FULL:
                kinds.add(False)
            elif type(spec) in _WINDOWED:
                kinds.add(True)
            else:
                raise UnsupportedGroup(
                    f"kvferry: KV cache group {index} ({type(spec).__name__}, layers {list(group.layer_names)}) "
                    "is not paged attention that kvferry can store or transfer; use another connector "
                    "for this model"
                )
            if spec.block_size != block_tokens:
                raise UnsupportedGroup(
                    f"kvferry: KV cache group {index} has blocks of {spec.block_size} tokens, the cache "
                    f"{block_tokens}; kvferry keys every group's blocks by the same token blocks"
                )
        windowed.append(True in kinds)
    return windowed
