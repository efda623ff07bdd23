"""Which of vLLM's KV cache groups the connector serves: full attention and sliding windows, each
told apart; anything else, and blocks of another size, refused with the group named.

They need vLLM; without it they skip, saying why, unless KVFERRY_REQUIRE_VLLM=1."""

import os

import pytest

try:
    import torch
    from vllm.v1.kv_cache_interface import (
        CircularBufferSpec,
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        MambaSpec,
        SlidingWindowSpec,
    )
except ImportError as e:
    if os.environ.get("KVFERRY_REQUIRE_VLLM") == "1":
        raise
    pytest.skip(f"vLLM is not importable here ({e}); the group tests run where it is", allow_module_level=True)

from kvferry.vllm.groups import UnsupportedGroup, windowed_groups

SHAPE = {"num_kv_heads": 2, "head_size": 64, "dtype": torch.float32}


def config(*specs) -> KVCacheConfig:
    groups = [KVCacheGroupSpec([f"layer{i}"], spec) for i, spec in enumerate(specs)]
    return KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=groups)


def test_full_attention_and_sliding_window_groups_are_served_and_told_apart():
    full = FullAttentionSpec(block_size=32, **SHAPE)
    window = SlidingWindowSpec(block_size=32, sliding_window=48, **SHAPE)
    assert windowed_groups(config(full), 32) == [False]
    assert windowed_groups(config(window, full, window), 32) == [True, False, True]


def test_a_group_the_connector_cannot_serve_is_refused_by_name():
    full = FullAttentionSpec(block_size=32, **SHAPE)
    ring = CircularBufferSpec(block_size=32, **SHAPE)
    with pytest.raises(UnsupportedGroup, match=r"group 1 \(CircularBufferSpec, layers \['layer1'\]\)"):
        windowed_groups(config(full, ring), 32)
    mamba = MambaSpec(block_size=32, shapes=((4, 4),), dtypes=(torch.float32,))
    with pytest.raises(UnsupportedGroup, match="group 0 .MambaSpec"):
        windowed_groups(config(mamba), 32)


def test_a_group_with_blocks_of_another_size_is_refused():
    groups = config(FullAttentionSpec(block_size=32, **SHAPE), SlidingWindowSpec(block_size=16, sliding_window=48, **SHAPE))
    with pytest.raises(UnsupportedGroup, match="group 1 has blocks of 16 tokens, the cache 32"):
        windowed_groups(groups, 32)
