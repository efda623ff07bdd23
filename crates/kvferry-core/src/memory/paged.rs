//! Paged KV gather/scatter: scattered blocks of a cache ↔ one contiguous staging buffer, as one
//! batch of as few copies as the layout allows.
//!
//! [`KvLayout::regions`] already merges runs that are contiguous in the cache; consecutive runs land
//! next to each other in the staging buffer, so every run is exactly one copy, and the list goes to
//! [`Device::copy_batch`](crate::Device::copy_batch) as one batch (one `cuMemcpyBatchAsync` on a
//! recent CUDA driver).

use crate::error::{Error, Result};
use crate::layout::{KvLayout, Selection};
use crate::memory::{CopyOp, MemRegion};

/// The copies that gather `selection` from the cache (one base address per tensor of `layout`) into
/// `staging`, packed in the layout's own order. Scatter is the same list with each op reversed.
pub fn gather_ops(
    layout: &KvLayout,
    selection: &Selection,
    tensors: &[u64],
    staging: MemRegion,
) -> Result<Vec<CopyOp>> {
    if tensors.len() != layout.num_tensors() as usize {
        return Err(Error::InvalidArgument(format!(
            "{} tensor base addresses for a layout of {} tensors",
            tensors.len(),
            layout.num_tensors()
        )));
    }
    let regions = layout.regions(selection)?;
    let needed = regions.iter().try_fold(0u64, |acc, r| acc.checked_add(r.len));
    match needed {
        Some(needed) if needed <= staging.len => {}
        _ => {
            return Err(Error::InvalidArgument(format!(
                "the selection needs {} bytes; the staging buffer holds {}",
                needed.map_or("more than 2^64".into(), |n| n.to_string()),
                staging.len
            )));
        }
    }
    let mut ops = Vec::with_capacity(regions.len());
    let mut at = staging.addr;
    for r in regions {
        let src = tensors[r.tensor as usize]
            .checked_add(r.offset)
            .ok_or_else(|| Error::InvalidArgument(format!("tensor {} base + {} overflows", r.tensor, r.offset)))?;
        ops.push(CopyOp { src, dst: at, len: r.len });
        at += r.len;
    }
    Ok(ops)
}

/// The reverse of [`gather_ops`]: `staging` → the blocks' places in the cache.
pub fn scatter_ops(
    layout: &KvLayout,
    selection: &Selection,
    tensors: &[u64],
    staging: MemRegion,
) -> Result<Vec<CopyOp>> {
    let mut ops = gather_ops(layout, selection, tensors, staging)?;
    for op in &mut ops {
        std::mem::swap(&mut op.src, &mut op.dst);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadline::Deadline;
    use crate::layout::{Dim, KvPlacement};
    use crate::memory::Device;
    use crate::memory::host::{HostAllocOptions, HostBuffer, HostDevice};
    use std::time::Duration;

    /// vLLM's FlashAttention cache: per layer `[2, num_blocks, block_size, heads, head_size]`.
    fn flash_attention(num_blocks: u32) -> KvLayout {
        KvLayout {
            num_layers: 3,
            num_blocks,
            block_size: 16,
            num_kv_heads: 2,
            head_size: 8,
            dtype_bytes: 2,
            kv_planes: 2,
            order: KvLayout::parse_order("LBNHC", KvPlacement::Split).unwrap(),
            tensor_per_layer: true,
        }
    }

    fn deadline() -> Deadline {
        Deadline::after(Duration::from_secs(10))
    }

    /// Byte `i` of tensor `t` holds a value unique to (t, i) modulo 251.
    fn patterned_tensors(layout: &KvLayout) -> Vec<HostBuffer> {
        (0..layout.num_tensors())
            .map(|t| {
                let b = HostBuffer::alloc(layout.tensor_bytes() as usize, &HostAllocOptions::new().with_pin(false))
                    .unwrap();
                let data: Vec<u8> = (0..b.len()).map(|i| ((i + 7 * t as usize) % 251) as u8).collect();
                b.write_at(0, &data).unwrap();
                b
            })
            .collect()
    }

    #[test]
    fn gather_packs_blocks_in_order_and_scatter_puts_them_back() {
        let layout = flash_attention(12);
        assert_eq!(layout.order[0], Dim::Layer);
        let cache = patterned_tensors(&layout);
        let bases: Vec<u64> = cache.iter().map(|b| b.as_ptr() as u64).collect();
        let blocks = [7u32, 8, 2, 11];
        let selection = Selection::blocks(&layout, &blocks);
        // One block of one K/V plane of one layer.
        let block_plane = (layout.block_bytes() / u64::from(2 * layout.num_layers)) as usize;
        let staging =
            HostBuffer::alloc(layout.block_bytes() as usize * blocks.len(), &HostAllocOptions::new()).unwrap();
        let device = HostDevice::with_threads(2).unwrap();

        let ops = gather_ops(&layout, &selection, &bases, staging.region()).unwrap();
        // Blocks 7 and 8 are adjacent: per layer and plane, 7+8, 2 and 11 are three copies.
        assert_eq!(ops.len(), 3 * 2 * 3);
        unsafe { device.copy_batch(&ops) }.unwrap().wait(deadline()).unwrap();

        // Expected by direct indexing: layer-major, then K/V plane, then the blocks as listed.
        let packed = staging.to_vec();
        let mut at = 0;
        for tensor in &cache {
            let tensor = tensor.to_vec();
            for plane in 0..2 {
                for &b in &blocks {
                    let start = plane * (layout.num_blocks as usize * block_plane) + b as usize * block_plane;
                    assert!(packed[at..at + block_plane] == tensor[start..start + block_plane], "block {b}");
                    at += block_plane;
                }
            }
        }

        // Scatter into a fresh cache moves exactly those blocks and leaves the rest untouched.
        let target: Vec<HostBuffer> = (0..3)
            .map(|_| {
                HostBuffer::alloc(layout.tensor_bytes() as usize, &HostAllocOptions::new().with_pin(false)).unwrap()
            })
            .collect();
        let target_bases: Vec<u64> = target.iter().map(|b| b.as_ptr() as u64).collect();
        let ops = scatter_ops(&layout, &selection, &target_bases, staging.region()).unwrap();
        unsafe { device.copy_batch(&ops) }.unwrap().wait(deadline()).unwrap();
        for (src, dst) in cache.iter().zip(&target) {
            let (src, dst) = (src.to_vec(), dst.to_vec());
            for plane in 0..2 {
                for b in 0..layout.num_blocks as usize {
                    let start = plane * (layout.num_blocks as usize * block_plane) + b * block_plane;
                    let moved = blocks.contains(&(b as u32));
                    if moved {
                        assert!(dst[start..start + block_plane] == src[start..start + block_plane], "block {b}");
                    } else {
                        assert!(dst[start..start + block_plane].iter().all(|&x| x == 0), "block {b} was touched");
                    }
                }
            }
        }
    }

    #[test]
    fn a_staging_buffer_too_small_or_wrong_tensor_count_is_refused() {
        let layout = flash_attention(4);
        let bases = [0x10_0000u64, 0x20_0000, 0x30_0000];
        let small = MemRegion::host(0x1000 as *const u8, layout.block_bytes() as usize);
        let err = gather_ops(&layout, &Selection::blocks(&layout, &[0, 1]), &bases, small).unwrap_err();
        assert!(err.to_string().contains("staging buffer holds"), "{err}");
        let err = gather_ops(&layout, &Selection::blocks(&layout, &[0]), &bases[..2], small).unwrap_err();
        assert!(err.to_string().contains("3 tensors"), "{err}");
        let err = gather_ops(&layout, &Selection::blocks(&layout, &[9]), &bases, small).unwrap_err();
        assert_eq!(err.code(), crate::error::ErrorCode::BlockOutOfRange);
    }
}
