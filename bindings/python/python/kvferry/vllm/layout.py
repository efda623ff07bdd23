"""Where each KV block lives in the engine's cache tensors, worked out from the tensors themselves.

vLLM lays a layer's cache out as a permutation of the logical axes [B, H, N, C] (plus a K/V axis for
most backends, and layer-major or block-major cross-layer layouts; see `vllm/v1/kv_cache_layout.py`).
Rather than assume one, the strides say it all: every axis with a larger stride than the block axis
repeats a block's bytes as separate segments (the K/V axis in `[2, B, H, N, C]`), and the axes with
smaller strides form one contiguous run inside a segment. The head axis, when it is the outermost axis
inside a segment, lets an engine with a different tensor-parallel size take a head range by offset.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence


class LayoutError(ValueError):
    """The cache tensors cannot be described as paged blocks, or two engines' layouts differ."""


@dataclass(frozen=True)
class LayerLayout:
    """One layer's blocks: block `b` is the segments `base + offset + b * block_stride`."""

    name: str
    base: int
    offsets: tuple[int, ...]
    segment_len: int
    block_stride: int
    # Bytes of one KV head inside a segment when heads are its outermost axis, else None.
    head_len: int | None
    num_heads: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base,
            "offsets": list(self.offsets),
            "segment_len": self.segment_len,
            "block_stride": self.block_stride,
            "head_len": self.head_len,
            "num_heads": self.num_heads,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "LayerLayout":
        try:
            return LayerLayout(
                name=str(d["name"]),
                base=int(d["base"]),
                offsets=tuple(int(o) for o in d["offsets"]),
                segment_len=int(d["segment_len"]),
                block_stride=int(d["block_stride"]),
                head_len=None if d["head_len"] is None else int(d["head_len"]),
                num_heads=int(d["num_heads"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutError(f"malformed layer layout {d!r}: {e}") from e

    def segments(self, block: int, heads: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """`(addr, len)` of each segment of `block`, or of heads `[lo, hi)` of each segment."""
        start = self.base + block * self.block_stride
        if heads is None:
            return [(start + off, self.segment_len) for off in self.offsets]
        lo, hi = heads
        assert self.head_len is not None
        return [(start + off + lo * self.head_len, (hi - lo) * self.head_len) for off in self.offsets]


def describe_layer(name: str, tensor: Any, num_blocks: int, num_heads: int | None = None) -> LayerLayout:
    """Describe a layer's cache tensor whose block axis has `num_blocks` entries."""
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    elem = tensor.element_size()
    block_axes = [i for i, size in enumerate(shape) if size == num_blocks]
    if not block_axes:
        raise LayoutError(f"{name}: no axis of {num_blocks} blocks in shape {shape}")
    # With several candidates (num_blocks equal to another axis' size) the outermost is the block
    # axis: vLLM never puts the block axis inside heads, tokens or channels.
    block_axis = max(block_axes, key=lambda i: strides[i])
    block_stride = strides[block_axis]
    inner = sorted(
        (i for i in range(len(shape)) if i != block_axis and shape[i] > 1 and strides[i] < block_stride),
        key=lambda i: strides[i],
    )
    run = 1
    for i in inner:
        if strides[i] != run:
            raise LayoutError(f"{name}: a block's bytes are not contiguous (shape {shape}, strides {strides})")
        run *= shape[i]
    outer = [i for i in range(len(shape)) if i != block_axis and shape[i] > 1 and strides[i] > block_stride]
    offsets = sorted(
        sum(idx * strides[ax] for idx, ax in zip(combo, outer)) * elem
        for combo in itertools.product(*(range(shape[ax]) for ax in outer))
    )
    head_len = None
    heads = 1
    if num_heads is not None and num_heads > 1:
        head_axes = [i for i in inner if shape[i] == num_heads]
        # Heads can be sliced by offset only when they are the outermost axis of the segment.
        if head_axes and head_axes[-1] == inner[-1]:
            head_len = strides[head_axes[-1]] * elem
        heads = num_heads
    elif num_heads == 1:
        head_len = run * elem
    return LayerLayout(
        name=name,
        base=tensor.data_ptr(),
        offsets=tuple(offsets),
        segment_len=run * elem,
        block_stride=block_stride * elem,
        head_len=head_len,
        num_heads=heads,
    )


def coalesce(pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Merge `(local, remote)` region pairs that continue each other on both sides."""
    merged: list[tuple[tuple[int, int], tuple[int, int]]] = []
    for (la, ll), (ra, rl) in sorted(pairs):
        if merged:
            (pla, pll), (pra, prl) = merged[-1]
            if pla + pll == la and pra + prl == ra and ll == rl and pll == prl:
                merged[-1] = ((pla, pll + ll), (pra, prl + rl))
                continue
        merged.append(((la, ll), (ra, rl)))
    return merged


def merge_regions(regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge address-adjacent `(addr, len)` regions, keeping their order otherwise."""
    merged: list[tuple[int, int]] = []
    for addr, length in regions:
        if merged and merged[-1][0] + merged[-1][1] == addr:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((addr, length))
    return merged


class KvLayout:
    """All layers of one engine rank; the unit of transfer and of the tier store is one block."""

    def __init__(self, layers: Sequence[LayerLayout], block_tokens: int, num_blocks: int):
        if not layers:
            raise LayoutError("no KV cache layers")
        self.layers = list(layers)
        self.block_tokens = block_tokens
        self.num_blocks = num_blocks

    @property
    def block_bytes(self) -> int:
        return sum(layer.segment_len * len(layer.offsets) for layer in self.layers)

    def block_regions(self, block: int) -> list[tuple[int, int]]:
        """Every byte of `block` across layers, as few regions as the layout allows."""
        return merge_regions([seg for layer in self.layers for seg in layer.segments(block)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_tokens": self.block_tokens,
            "num_blocks": self.num_blocks,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "KvLayout":
        try:
            return KvLayout([LayerLayout.from_dict(x) for x in d["layers"]], int(d["block_tokens"]), int(d["num_blocks"]))
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutError(f"malformed layout: {e}") from e


def head_range(rank: int, tp_size: int, total_heads: int) -> tuple[int, int]:
    """The KV heads `[lo, hi)` rank `rank` of `tp_size` holds (replicated when heads < ranks)."""
    if total_heads >= tp_size:
        if total_heads % tp_size:
            raise LayoutError(f"{total_heads} KV heads do not split over {tp_size} ranks")
        per = total_heads // tp_size
        return rank * per, (rank + 1) * per
    lo = rank * total_heads // tp_size
    return lo, lo + 1


def sources(rank: int, tp_size: int, total_heads: int, remote: dict[int, tuple[int, int]]) -> list[int]:
    """The remote ranks (`rank -> (tp_size, total_heads)`) a local rank reads its heads from: the
    first holder of each head range, so replicated heads are read once."""
    mine = head_range(rank, tp_size, total_heads)
    chosen, covered = [], set()
    for r in sorted(remote):
        theirs = head_range(r, *remote[r])
        lo, hi = max(mine[0], theirs[0]), min(mine[1], theirs[1])
        if lo < hi and (lo, hi) not in covered:
            covered.add((lo, hi))
            chosen.append(r)
    return chosen


def read_plan(
    local: KvLayout,
    local_heads: tuple[int, int],
    remote: KvLayout,
    remote_heads: tuple[int, int],
    local_blocks: Sequence[int],
    remote_blocks: Sequence[int],
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """`(local, remote)` region pairs that bring the overlap of two ranks' heads for these blocks.

    Equal head ranges move whole segments; different tensor-parallel sizes move the overlapping
    head range of each segment, which needs heads outermost inside a segment on both sides.
    """
    if len(local.layers) != len(remote.layers):
        raise LayoutError(f"{len(local.layers)} local layers but {len(remote.layers)} remote")
    if local.block_tokens != remote.block_tokens:
        raise LayoutError(f"block of {local.block_tokens} tokens here, {remote.block_tokens} remote")
    lo, hi = max(local_heads[0], remote_heads[0]), min(local_heads[1], remote_heads[1])
    if lo >= hi:
        return []
    whole = local_heads == remote_heads
    pairs = []
    for ll, rl in zip(local.layers, remote.layers):
        if len(ll.offsets) != len(rl.offsets):
            raise LayoutError(f"layer {ll.name}: {len(ll.offsets)} segments here, {len(rl.offsets)} remote")
        if whole:
            if ll.segment_len != rl.segment_len:
                raise LayoutError(f"layer {ll.name}: {ll.segment_len}-byte segments here, {rl.segment_len} remote")
            local_range = remote_range = None
        else:
            if ll.head_len is None or rl.head_len is None:
                raise LayoutError(
                    f"layer {ll.name}: different tensor-parallel sizes need heads outermost in a block"
                )
            if ll.head_len != rl.head_len:
                raise LayoutError(f"layer {ll.name}: {ll.head_len}-byte heads here, {rl.head_len} remote")
            local_range = (lo - local_heads[0], hi - local_heads[0])
            remote_range = (lo - remote_heads[0], hi - remote_heads[0])
        for lb, rb in zip(local_blocks, remote_blocks):
            pairs.extend(zip(ll.segments(lb, local_range), rl.segments(rb, remote_range)))
    return coalesce(pairs)
