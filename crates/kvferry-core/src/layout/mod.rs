//! KV cache layout arithmetic: describes a paged KV cache as a dense tensor whose six dims are stored
//! in some order, and turns a selection of blocks into coalesced byte regions.
//!
//! Everything here is pure arithmetic. The cost of [`KvLayout::regions`] and [`KvLayout::pair`] is
//! proportional to the number of contiguous chunks, never to the number of elements: the innermost
//! dims that are fully selected and densely stored collapse into one chunk, and runs of consecutive
//! indices in the dim just outside them collapse further.

use std::ops::Range;

use crate::error::Result;

pub(crate) mod error;

pub use error::LayoutError;

/// One dimension of a KV cache tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// Transformer layer.
    Layer,
    /// K or V plane (a single plane for MLA caches).
    Kv,
    /// Cache block (page).
    Block,
    /// KV head.
    Head,
    /// Token within a block.
    Token,
    /// Element within a head.
    Channel,
}

impl Dim {
    /// All dims, in declaration order.
    pub const ALL: [Dim; 6] = [Dim::Layer, Dim::Kv, Dim::Block, Dim::Head, Dim::Token, Dim::Channel];

    fn index(self) -> usize {
        self as usize
    }

    fn from_letter(c: char) -> Option<Dim> {
        match c.to_ascii_uppercase() {
            'L' => Some(Dim::Layer),
            'K' => Some(Dim::Kv),
            'B' => Some(Dim::Block),
            'H' => Some(Dim::Head),
            'N' => Some(Dim::Token),
            'C' => Some(Dim::Channel),
            _ => None,
        }
    }
}

/// Where the K/V plane dim goes when a layout string leaves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvPlacement {
    /// K and V are separate planes outside the blocks: `L K B ...`.
    Split,
    /// K and V are packed inside each block: `L B K ...`.
    Packed,
}

/// Shape and stride order of a paged KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: u32,
    pub num_blocks: u32,
    /// Tokens per block.
    pub block_size: u32,
    pub num_kv_heads: u32,
    pub head_size: u32,
    pub dtype_bytes: u32,
    /// 2 for K and V, 1 for MLA.
    pub kv_planes: u32,
    /// Dims outermost first, over a dense row-major tensor.
    pub order: [Dim; 6],
    /// Each layer is its own tensor (Layer must then be outermost); regions carry the layer as
    /// their `tensor`.
    pub tensor_per_layer: bool,
}

/// The part of a cache to transfer: the listed blocks (in list order, repeats allowed) restricted to
/// a range of layers and of heads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection<'a> {
    pub blocks: &'a [u32],
    pub layers: Range<u32>,
    pub heads: Range<u32>,
}

impl<'a> Selection<'a> {
    /// The given blocks across all layers and heads of `layout`.
    pub fn blocks(layout: &KvLayout, blocks: &'a [u32]) -> Self {
        Selection { blocks, layers: 0..layout.num_layers, heads: 0..layout.num_kv_heads }
    }

    fn indices(&self, d: Dim, layout: &KvLayout) -> Indices<'a> {
        match d {
            Dim::Block => Indices::List(self.blocks),
            Dim::Layer => Indices::Range(self.layers.clone()),
            Dim::Head => Indices::Range(self.heads.clone()),
            _ => Indices::Range(0..layout.dim_size(d)),
        }
    }
}

/// A contiguous byte range of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// The layer when the layout has a tensor per layer, else 0.
    pub tensor: u32,
    /// Bytes from the tensor's base.
    pub offset: u64,
    pub len: u64,
}

impl KvLayout {
    /// Parses a layout string, outermost dim first: five letters from `LBHNC` (the K/V plane is
    /// then inserted next to `B` as `placement` says) or six letters with an explicit `K` (then
    /// `placement` is ignored). Case-insensitive, each letter once.
    pub fn parse_order(s: &str, placement: KvPlacement) -> Result<[Dim; 6]> {
        let invalid =
            |why: &str| -> crate::Error { LayoutError::Invalid(format!("layout string {s:?}: {why}")).into() };
        let mut dims = Vec::with_capacity(6);
        for c in s.chars() {
            let d = Dim::from_letter(c).ok_or_else(|| invalid(&format!("{c:?} is not one of L K B H N C")))?;
            if dims.contains(&d) {
                return Err(invalid(&format!("{c:?} appears twice")));
            }
            dims.push(d);
        }
        match dims.len() {
            6 => {}
            5 if !dims.contains(&Dim::Kv) => {
                // Five distinct letters without K always contain B.
                let b = dims.iter().position(|&d| d == Dim::Block).unwrap_or_default();
                let at = match placement {
                    KvPlacement::Split => b,
                    KvPlacement::Packed => b + 1,
                };
                dims.insert(at, Dim::Kv);
            }
            _ => return Err(invalid("expected the five letters LBHNC or six letters with K")),
        }
        let mut order = [Dim::Layer; 6];
        order.copy_from_slice(&dims);
        Ok(order)
    }

    /// Checks that every dim is non-zero, `kv_planes` is 1 or 2, `order` is a permutation, Layer is
    /// outermost when each layer is its own tensor, and the whole cache fits in 64 bits of bytes.
    pub fn validate(&self) -> Result<()> {
        let invalid = |why: String| -> Result<()> { Err(LayoutError::Invalid(why).into()) };
        for d in Dim::ALL {
            if self.dim_size(d) == 0 {
                return invalid(format!("{d:?} has size 0"));
            }
        }
        if self.dtype_bytes == 0 {
            return invalid("dtype_bytes is 0".into());
        }
        if self.kv_planes > 2 {
            return invalid(format!("kv_planes is {}, expected 1 or 2", self.kv_planes));
        }
        for d in Dim::ALL {
            if !self.order.contains(&d) {
                return invalid(format!("order {:?} lacks {d:?}", self.order));
            }
        }
        if self.tensor_per_layer && self.order[0] != Dim::Layer {
            return invalid(format!("order {:?} must start with Layer when each layer is its own tensor", self.order));
        }
        Dim::ALL
            .iter()
            .try_fold(u64::from(self.dtype_bytes), |acc, &d| acc.checked_mul(u64::from(self.dim_size(d))))
            .ok_or(LayoutError::Overflow)?;
        Ok(())
    }

    /// `num_layers` when each layer is its own tensor, else 1.
    pub fn num_tensors(&self) -> u32 {
        if self.tensor_per_layer { self.num_layers } else { 1 }
    }

    /// Bytes of one tensor.
    pub fn tensor_bytes(&self) -> u64 {
        let all = self.block_bytes() * u64::from(self.num_blocks);
        all / u64::from(self.num_tensors())
    }

    /// Bytes one block occupies across all layers and planes.
    pub fn block_bytes(&self) -> u64 {
        [Dim::Layer, Dim::Kv, Dim::Head, Dim::Token, Dim::Channel]
            .iter()
            .fold(u64::from(self.dtype_bytes), |acc, &d| acc * u64::from(self.dim_size(d)))
    }

    pub fn dim_size(&self, d: Dim) -> u32 {
        match d {
            Dim::Layer => self.num_layers,
            Dim::Kv => self.kv_planes,
            Dim::Block => self.num_blocks,
            Dim::Head => self.num_kv_heads,
            Dim::Token => self.block_size,
            Dim::Channel => self.head_size,
        }
    }

    /// Byte stride of each dim (indexed by `Dim::index`) within its tensor. Layer has stride 0
    /// when each layer is its own tensor: it picks the tensor instead.
    fn strides(&self) -> [u64; 6] {
        let mut strides = [0; 6];
        let mut acc = u64::from(self.dtype_bytes);
        for &d in self.order.iter().rev() {
            if d == Dim::Layer && self.tensor_per_layer {
                continue;
            }
            strides[d.index()] = acc;
            acc *= u64::from(self.dim_size(d));
        }
        strides
    }

    fn check_selection(&self, sel: &Selection) -> Result<()> {
        check_range("layer", &sel.layers, self.num_layers)?;
        check_range("head", &sel.heads, self.num_kv_heads)?;
        if let Some(&block) = sel.blocks.iter().find(|&&b| b >= self.num_blocks) {
            return Err(LayoutError::BlockOutOfRange { block, num_blocks: self.num_blocks }.into());
        }
        Ok(())
    }

    /// The byte regions of the selected elements, enumerated in this layout's dim order (blocks in
    /// list order), with adjacent regions merged.
    pub fn regions(&self, sel: &Selection) -> Result<Vec<Region>> {
        self.validate()?;
        self.check_selection(sel)?;
        Ok(walk(self.order, [(self, sel)]).into_iter().map(|[r]| r).collect())
    }

    /// Matching byte regions of two caches: both selections are enumerated in `local`'s dim order
    /// and paired element by element; a pair of regions grows only while both sides stay adjacent.
    /// Works across stride orders and head ranges (heterogeneous tensor parallelism).
    pub fn pair(
        local: &KvLayout,
        local_sel: &Selection,
        remote: &KvLayout,
        remote_sel: &Selection,
    ) -> Result<Vec<(Region, Region)>> {
        local.validate()?;
        remote.validate()?;
        local.check_selection(local_sel)?;
        remote.check_selection(remote_sel)?;
        local.check_same_block_shape(remote)?;
        for (what, l, r) in [
            ("selected block count", local_sel.blocks.len(), remote_sel.blocks.len()),
            ("selected layer count", local_sel.layers.len(), remote_sel.layers.len()),
            ("selected head count", local_sel.heads.len(), remote_sel.heads.len()),
        ] {
            if l != r {
                return Err(incompatible(what, l, r));
            }
        }
        let pairs = walk(local.order, [(local, local_sel), (remote, remote_sel)]);
        Ok(pairs.into_iter().map(|[l, r]| (l, r)).collect())
    }

    /// Checks that blocks of `self` and `other` hold the same data: same block_size, head_size,
    /// dtype_bytes, kv_planes and num_layers.
    pub fn check_compatible(&self, other: &KvLayout) -> Result<()> {
        self.check_same_block_shape(other)?;
        if self.num_layers != other.num_layers {
            return Err(incompatible("num_layers", self.num_layers, other.num_layers));
        }
        Ok(())
    }

    /// Checks that one layer of a block has the same shape per head on both sides:
    /// same block_size, head_size, dtype_bytes and kv_planes.
    fn check_same_block_shape(&self, other: &KvLayout) -> Result<()> {
        for (what, a, b) in [
            ("block_size", self.block_size, other.block_size),
            ("head_size", self.head_size, other.head_size),
            ("dtype_bytes", self.dtype_bytes, other.dtype_bytes),
            ("kv_planes", self.kv_planes, other.kv_planes),
        ] {
            if a != b {
                return Err(incompatible(what, a, b));
            }
        }
        Ok(())
    }
}

/// The heads a tensor-parallel rank owns: `total_heads / tp_size` each, or, when there are more
/// ranks than heads, the one head `rank * total_heads / tp_size` (replicated across ranks).
pub fn heads_for_rank(total_heads: u32, tp_size: u32, rank: u32) -> Result<Range<u32>> {
    let invalid = |why: String| -> Result<Range<u32>> { Err(LayoutError::Invalid(why).into()) };
    if total_heads == 0 || tp_size == 0 {
        return invalid(format!("{total_heads} heads over tensor-parallel size {tp_size}"));
    }
    if rank >= tp_size {
        return invalid(format!("rank {rank} is outside tensor-parallel size {tp_size}"));
    }
    let (big, small) = (total_heads.max(tp_size), total_heads.min(tp_size));
    if big % small != 0 {
        return invalid(format!("{total_heads} heads do not divide over {tp_size} ranks"));
    }
    if tp_size <= total_heads {
        let per = total_heads / tp_size;
        Ok(rank * per..(rank + 1) * per)
    } else {
        // u64 because rank * total_heads can exceed u32.
        let head = (u64::from(rank) * u64::from(total_heads) / u64::from(tp_size)) as u32;
        Ok(head..head + 1)
    }
}

fn check_range(what: &str, r: &Range<u32>, size: u32) -> Result<()> {
    if r.is_empty() || r.end > size {
        return Err(LayoutError::Invalid(format!("{what} range {r:?} is empty or outside 0..{size}")).into());
    }
    Ok(())
}

fn incompatible(what: &str, a: impl std::fmt::Display, b: impl std::fmt::Display) -> crate::Error {
    LayoutError::Incompatible(format!("{what} differs: {a} vs {b}")).into()
}

/// The indices a selection iterates over in one dim.
enum Indices<'a> {
    Range(Range<u32>),
    List(&'a [u32]),
}

impl Indices<'_> {
    fn len(&self) -> usize {
        match self {
            Indices::Range(r) => r.len(),
            Indices::List(l) => l.len(),
        }
    }

    fn get(&self, pos: usize) -> u32 {
        match self {
            Indices::Range(r) => r.start + pos as u32,
            Indices::List(l) => l[pos],
        }
    }

    fn is_full(&self, size: u32) -> bool {
        match self {
            Indices::Range(r) => *r == (0..size),
            Indices::List(l) => l.len() == size as usize && l.iter().enumerate().all(|(i, &b)| b == i as u32),
        }
    }
}

/// Where an element (or chunk) starts on one side.
#[derive(Clone, Copy, Default)]
struct Addr {
    tensor: u32,
    offset: u64,
}

impl Addr {
    fn add(self, other: Addr) -> Addr {
        Addr { tensor: self.tensor + other.tensor, offset: self.offset + other.offset }
    }
}

/// One side of a walk: its layout, selection and byte strides.
struct Side<'a> {
    layout: &'a KvLayout,
    sel: &'a Selection<'a>,
    strides: [u64; 6],
}

impl<'a> Side<'a> {
    fn indices(&self, d: Dim) -> Indices<'a> {
        self.sel.indices(d, self.layout)
    }

    fn addr(&self, d: Dim, index: u32) -> Addr {
        if d == Dim::Layer && self.layout.tensor_per_layer {
            Addr { tensor: index, offset: 0 }
        } else {
            Addr { tensor: 0, offset: u64::from(index) * self.strides[d.index()] }
        }
    }
}

/// Enumerates the selections of all sides jointly in `order` and returns coalesced region tuples.
///
/// The innermost dims that every side selects fully and stores densely form one chunk. The dim just
/// outside them is cut into runs of positions whose indices are consecutive on every side, each run
/// one longer chunk; the remaining outer dims are iterated as a cartesian product. Both layouts and
/// selections must already be validated and agree in shape.
fn walk<const N: usize>(order: [Dim; 6], sides: [(&KvLayout, &Selection); N]) -> Vec<[Region; N]> {
    let sides = sides.map(|(layout, sel)| Side { layout, sel, strides: layout.strides() });
    if sides[0].sel.blocks.is_empty() {
        return Vec::new();
    }

    // Bytes of one chunk of the dense suffix; equal on all sides as their shapes agree.
    let mut span = u64::from(sides[0].layout.dtype_bytes);
    let mut inner = 6;
    while inner > 0 {
        let d = order[inner - 1];
        let dense = sides.iter().all(|s| {
            let size = s.layout.dim_size(d);
            s.indices(d).is_full(size) && (size == 1 || s.strides[d.index()] == span)
        });
        if !dense {
            break;
        }
        span *= u64::from(sides[0].layout.dim_size(d));
        inner -= 1;
    }

    // Runs of the dim just outside the dense suffix: (start address per side, bytes).
    let mut runs: Vec<([Addr; N], u64)> = Vec::new();
    let outer = match inner.checked_sub(1) {
        None => {
            runs.push(([Addr::default(); N], span));
            0
        }
        Some(outer) => {
            let d = order[outer];
            let idx = sides.each_ref().map(|s| s.indices(d));
            let adjacent_steps = sides.iter().all(|s| s.strides[d.index()] == span);
            let len = idx[0].len();
            let mut start = 0;
            for pos in 1..=len {
                let extends =
                    pos < len && adjacent_steps && idx.iter().all(|ix| ix.get(pos) == ix.get(pos - 1).wrapping_add(1));
                if !extends {
                    let addrs = std::array::from_fn(|s| sides[s].addr(d, idx[s].get(start)));
                    runs.push((addrs, (pos - start) as u64 * span));
                    start = pos;
                }
            }
            outer
        }
    };

    // Address of every position of every outer dim, per side.
    let tables: Vec<Vec<[Addr; N]>> = order[..outer]
        .iter()
        .map(|&d| {
            let idx = sides.each_ref().map(|s| s.indices(d));
            (0..idx[0].len()).map(|pos| std::array::from_fn(|s| sides[s].addr(d, idx[s].get(pos)))).collect()
        })
        .collect();

    let chunks = tables.iter().map(Vec::len).product::<usize>() * runs.len();
    let mut out: Vec<[Region; N]> = Vec::with_capacity(chunks);
    let mut pos = [0usize; 6];
    loop {
        let base: [Addr; N] =
            std::array::from_fn(|s| tables.iter().zip(&pos).fold(Addr::default(), |acc, (t, &p)| acc.add(t[p][s])));
        for (start, len) in &runs {
            let cur: [Region; N] = std::array::from_fn(|s| {
                let a = base[s].add(start[s]);
                Region { tensor: a.tensor, offset: a.offset, len: *len }
            });
            match out.last_mut() {
                Some(last)
                    if last.iter().zip(&cur).all(|(l, c)| l.tensor == c.tensor && l.offset + l.len == c.offset) =>
                {
                    last.iter_mut().for_each(|l| l.len += len);
                }
                _ => out.push(cur),
            }
        }
        // Odometer over the outer dims, innermost fastest.
        let mut k = outer;
        loop {
            if k == 0 {
                return out;
            }
            k -= 1;
            pos[k] += 1;
            if pos[k] < tables[k].len() {
                break;
            }
            pos[k] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, ErrorCode};
    use proptest::prelude::*;

    const FLASH_ATTN: [Dim; 6] = [Dim::Layer, Dim::Kv, Dim::Block, Dim::Token, Dim::Head, Dim::Channel];

    fn flash_attn(num_layers: u32, num_blocks: u32) -> KvLayout {
        KvLayout {
            num_layers,
            num_blocks,
            block_size: 16,
            num_kv_heads: 8,
            head_size: 128,
            dtype_bytes: 2,
            kv_planes: 2,
            order: FLASH_ATTN,
            tensor_per_layer: true,
        }
    }

    fn layout_error(e: Error) -> LayoutError {
        match e {
            Error::Layout(e) => e,
            other => panic!("expected a layout error, got {other:?}"),
        }
    }

    fn region(tensor: u32, offset: u64, len: u64) -> Region {
        Region { tensor, offset, len }
    }

    // ---- Brute-force reference: enumerate every element. ----

    fn index_list(l: &KvLayout, sel: &Selection, d: Dim) -> Vec<u32> {
        match d {
            Dim::Block => sel.blocks.to_vec(),
            Dim::Layer => sel.layers.clone().collect(),
            Dim::Head => sel.heads.clone().collect(),
            _ => (0..l.dim_size(d)).collect(),
        }
    }

    /// Row-major address of an element given its index in every dim.
    fn element_addr(l: &KvLayout, coord: &[u32; 6]) -> (u32, u64) {
        let mut off = 0u64;
        for &d in &l.order {
            if d == Dim::Layer && l.tensor_per_layer {
                continue;
            }
            off = off * u64::from(l.dim_size(d)) + u64::from(coord[d as usize]);
        }
        let tensor = if l.tensor_per_layer { coord[Dim::Layer as usize] } else { 0 };
        (tensor, off * u64::from(l.dtype_bytes))
    }

    fn reference(order: [Dim; 6], sides: &[(&KvLayout, &Selection)]) -> Vec<Vec<Region>> {
        let lists: Vec<[Vec<u32>; 6]> = sides.iter().map(|(l, s)| Dim::ALL.map(|d| index_list(l, s, d))).collect();
        let lens = Dim::ALL.map(|d| lists[0][d as usize].len());
        let mut out: Vec<Vec<Region>> = Vec::new();
        let mut pos = [0usize; 6];
        if lens.contains(&0) {
            return out;
        }
        loop {
            let elems: Vec<Region> = sides
                .iter()
                .zip(&lists)
                .map(|((l, _), list)| {
                    let coord = Dim::ALL.map(|d| list[d as usize][pos[d as usize]]);
                    let (tensor, offset) = element_addr(l, &coord);
                    region(tensor, offset, u64::from(l.dtype_bytes))
                })
                .collect();
            let merge = out.last().is_some_and(|last| {
                last.iter().zip(&elems).all(|(a, e)| a.tensor == e.tensor && a.offset + a.len == e.offset)
            });
            if merge {
                let last = out.last_mut().unwrap();
                last.iter_mut().zip(&elems).for_each(|(a, e)| a.len += e.len);
            } else {
                out.push(elems);
            }
            let mut k = 6;
            loop {
                if k == 0 {
                    return out;
                }
                k -= 1;
                let d = order[k] as usize;
                pos[d] += 1;
                if pos[d] < lens[d] {
                    break;
                }
                pos[d] = 0;
            }
        }
    }

    fn check_bounds(l: &KvLayout, sel: &Selection, regions: &[Region]) {
        let selected = sel.blocks.len() as u64
            * sel.layers.len() as u64
            * sel.heads.len() as u64
            * u64::from(l.kv_planes * l.block_size * l.head_size * l.dtype_bytes);
        assert_eq!(regions.iter().map(|r| r.len).sum::<u64>(), selected);
        for r in regions {
            assert!(r.len > 0 && r.tensor < l.num_tensors(), "{r:?} in {l:?}");
            assert!(r.offset + r.len <= l.tensor_bytes(), "{r:?} leaves the tensor of {l:?}");
        }
    }

    // ---- Strategies: small random layouts and selections. ----

    #[derive(Debug, Clone)]
    struct Sel {
        blocks: Vec<u32>,
        layers: Range<u32>,
        heads: Range<u32>,
    }

    impl Sel {
        fn get(&self) -> Selection<'_> {
            Selection { blocks: &self.blocks, layers: self.layers.clone(), heads: self.heads.clone() }
        }
    }

    fn arb_order(tensor_per_layer: bool) -> impl Strategy<Value = [Dim; 6]> {
        Just(Dim::ALL.to_vec()).prop_shuffle().prop_map(move |v| {
            let mut order: [Dim; 6] = v.try_into().unwrap();
            if tensor_per_layer {
                let at = order.iter().position(|&d| d == Dim::Layer).unwrap();
                order[..=at].rotate_right(1);
            }
            order
        })
    }

    /// A layout sharing `(block_size, head_size, dtype_bytes, kv_planes)`.
    fn arb_layout(common: (u32, u32, u32, u32)) -> impl Strategy<Value = KvLayout> {
        let (block_size, head_size, dtype_bytes, kv_planes) = common;
        (1..=4u32, 1..=5u32, 1..=4u32, any::<bool>()).prop_flat_map(
            move |(num_layers, num_blocks, num_kv_heads, tensor_per_layer)| {
                arb_order(tensor_per_layer).prop_map(move |order| KvLayout {
                    num_layers,
                    num_blocks,
                    block_size,
                    num_kv_heads,
                    head_size,
                    dtype_bytes,
                    kv_planes,
                    order,
                    tensor_per_layer,
                })
            },
        )
    }

    fn arb_common() -> impl Strategy<Value = (u32, u32, u32, u32)> {
        (1..=4u32, 1..=4u32, prop_oneof![Just(1u32), Just(2), Just(4)], 1..=2u32)
    }

    fn arb_sub_range(size: u32, len: u32) -> impl Strategy<Value = Range<u32>> {
        (0..=size - len).prop_map(move |start| start..start + len)
    }

    /// `n` block ids below `num_blocks`: random with repeats, or a consecutive run when it fits.
    fn arb_blocks(num_blocks: u32, n: usize) -> BoxedStrategy<Vec<u32>> {
        let random = prop::collection::vec(0..num_blocks, n);
        if n as u32 > num_blocks {
            return random.boxed();
        }
        let run = (0..=num_blocks - n as u32).prop_map(move |s| (s..s + n as u32).collect());
        prop_oneof![random, run].boxed()
    }

    fn arb_single() -> impl Strategy<Value = (KvLayout, Sel)> {
        arb_common().prop_flat_map(arb_layout).prop_flat_map(|l| {
            let layers = (1..=l.num_layers).prop_flat_map({
                let n = l.num_layers;
                move |len| arb_sub_range(n, len)
            });
            let heads = (1..=l.num_kv_heads).prop_flat_map({
                let n = l.num_kv_heads;
                move |len| arb_sub_range(n, len)
            });
            let blocks = (0..=6usize).prop_flat_map({
                let n = l.num_blocks;
                move |len| arb_blocks(n, len)
            });
            (Just(l), blocks, layers, heads).prop_map(|(l, blocks, layers, heads)| (l, Sel { blocks, layers, heads }))
        })
    }

    fn arb_pair() -> impl Strategy<Value = (KvLayout, Sel, KvLayout, Sel)> {
        arb_common()
            .prop_flat_map(|c| (arb_layout(c), arb_layout(c)))
            .prop_flat_map(|(a, b)| {
                let shape = (1..=a.num_layers.min(b.num_layers), 1..=a.num_kv_heads.min(b.num_kv_heads), 0..=6usize);
                (Just(a), Just(b), shape)
            })
            .prop_flat_map(|(a, b, (layer_len, head_len, n))| {
                let side = |l: &KvLayout| {
                    (
                        arb_blocks(l.num_blocks, n),
                        arb_sub_range(l.num_layers, layer_len),
                        arb_sub_range(l.num_kv_heads, head_len),
                    )
                        .prop_map(|(blocks, layers, heads)| Sel { blocks, layers, heads })
                };
                (side(&a), side(&b), Just(a), Just(b))
            })
            .prop_map(|(sa, sb, a, b)| (a, sa, b, sb))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn regions_match_reference((layout, sel) in arb_single()) {
            let sel = sel.get();
            let got = layout.regions(&sel).unwrap();
            let want: Vec<Region> =
                reference(layout.order, &[(&layout, &sel)]).into_iter().map(|r| r[0]).collect();
            prop_assert_eq!(&got, &want);
            check_bounds(&layout, &sel, &got);
        }

        #[test]
        fn pair_matches_reference((local, ls, remote, rs) in arb_pair()) {
            let (ls, rs) = (ls.get(), rs.get());
            let got = KvLayout::pair(&local, &ls, &remote, &rs).unwrap();
            let want: Vec<(Region, Region)> = reference(local.order, &[(&local, &ls), (&remote, &rs)])
                .into_iter()
                .map(|r| (r[0], r[1]))
                .collect();
            prop_assert_eq!(&got, &want);
            for (l, r) in &got {
                prop_assert_eq!(l.len, r.len);
            }
            let (lr, rr): (Vec<Region>, Vec<Region>) = got.into_iter().unzip();
            check_bounds(&local, &ls, &lr);
            check_bounds(&remote, &rs, &rr);
        }
    }

    // ---- Targeted cases. ----

    #[test]
    fn flash_attention_contiguous_blocks_give_one_region_per_layer_and_plane() {
        let l = flash_attn(3, 100);
        let blocks: Vec<u32> = (10..20).collect();
        let got = l.regions(&Selection::blocks(&l, &blocks)).unwrap();
        let block = 16 * 8 * 128 * 2;
        let plane = 100 * block;
        let want: Vec<Region> =
            (0..3).flat_map(|t| (0..2).map(move |k| region(t, k * plane + 10 * block, 10 * block))).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn flash_infer_packed_blocks_coalesce_across_planes() {
        let order = KvLayout::parse_order("LBNHC", KvPlacement::Packed).unwrap();
        let l = KvLayout { order, ..flash_attn(2, 50) };
        let blocks = [7, 8, 9, 3];
        let got = l.regions(&Selection::blocks(&l, &blocks)).unwrap();
        let block = 2 * 16 * 8 * 128 * 2;
        let want =
            (0..2).flat_map(|t| [region(t, 7 * block, 3 * block), region(t, 3 * block, block)]).collect::<Vec<_>>();
        assert_eq!(got, want);
    }

    #[test]
    fn block_list_order_is_kept() {
        let l = KvLayout { tensor_per_layer: false, ..flash_attn(1, 8) };
        let got = l.regions(&Selection::blocks(&l, &[5, 4])).unwrap();
        let block = 16 * 8 * 128 * 2;
        let plane = 8 * block;
        let want = vec![
            region(0, 5 * block, block),
            region(0, 4 * block, block),
            region(0, plane + 5 * block, block),
            region(0, plane + 4 * block, block),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn whole_single_tensor_is_one_region() {
        let l = KvLayout { tensor_per_layer: false, ..flash_attn(4, 6) };
        let blocks: Vec<u32> = (0..6).collect();
        let got = l.regions(&Selection::blocks(&l, &blocks)).unwrap();
        assert_eq!(got, vec![region(0, 0, l.tensor_bytes())]);
    }

    #[test]
    fn heterogeneous_tp_pair_follows_local_head_range() {
        // Local TP 1 with 8 heads sends heads 4..8 to a TP 2 rank holding 4 heads; with heads
        // outside tokens (HND) each (layer, plane, block) is one contiguous piece on both sides.
        let order = KvLayout::parse_order("LBHNC", KvPlacement::Split).unwrap();
        let local = KvLayout { order, ..flash_attn(2, 10) };
        let remote = KvLayout { num_kv_heads: 4, ..local.clone() };
        let heads = heads_for_rank(8, 2, 1).unwrap();
        let ls = Selection { heads, ..Selection::blocks(&local, &[0, 1]) };
        let rs = Selection::blocks(&remote, &[6, 7]);
        let got = KvLayout::pair(&local, &ls, &remote, &rs).unwrap();
        let head = 16 * 128 * 2;
        let (lblock, rblock) = (8 * head, 4 * head);
        let mut want = Vec::new();
        for t in 0..2 {
            for k in 0..2 {
                for b in 0..2 {
                    want.push((
                        region(t, k * 10 * lblock + b * lblock + 4 * head, 4 * head),
                        region(t, k * 10 * rblock + (6 + b) * rblock, 4 * head),
                    ));
                }
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn parse_order_places_kv() {
        use Dim::*;
        assert_eq!(
            KvLayout::parse_order("LBHNC", KvPlacement::Split).unwrap(),
            [Layer, Kv, Block, Head, Token, Channel]
        );
        assert_eq!(
            KvLayout::parse_order("lbhnc", KvPlacement::Packed).unwrap(),
            [Layer, Block, Kv, Head, Token, Channel]
        );
        assert_eq!(
            KvLayout::parse_order("KLBNHC", KvPlacement::Packed).unwrap(),
            [Kv, Layer, Block, Token, Head, Channel]
        );
        assert_eq!(KvLayout::parse_order("lKbNhC", KvPlacement::Packed).unwrap(), FLASH_ATTN);
    }

    #[test]
    fn parse_order_rejects_bad_strings() {
        for s in ["", "LBHN", "LBHNX", "LBBNC", "LKBHNCC", "LKBHN", "LKBHNK", "LBHNC "] {
            let err = KvLayout::parse_order(s, KvPlacement::Split).unwrap_err();
            assert!(matches!(layout_error(err), LayoutError::Invalid(_)), "{s:?}");
        }
    }

    #[test]
    fn sizes() {
        let l = flash_attn(32, 1000);
        assert_eq!(l.block_bytes(), 32 * 2 * 16 * 8 * 128 * 2);
        assert_eq!(l.num_tensors(), 32);
        assert_eq!(l.tensor_bytes(), 2 * 1000 * 16 * 8 * 128 * 2);
        let single = KvLayout { tensor_per_layer: false, ..l.clone() };
        assert_eq!(single.num_tensors(), 1);
        assert_eq!(single.tensor_bytes(), 1000 * l.block_bytes());
        assert_eq!(l.dim_size(Dim::Kv), 2);
        assert_eq!(l.dim_size(Dim::Token), 16);
    }

    fn invalid_layout(l: KvLayout) -> String {
        let err = l.validate().unwrap_err();
        assert_eq!(err.code(), ErrorCode::LayoutInvalid);
        match layout_error(err) {
            LayoutError::Invalid(why) => why,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn validate_rejects_bad_layouts() {
        let good = flash_attn(2, 4);
        good.validate().unwrap();
        assert!(invalid_layout(KvLayout { num_blocks: 0, ..good.clone() }).contains("Block"));
        assert!(invalid_layout(KvLayout { dtype_bytes: 0, ..good.clone() }).contains("dtype"));
        assert!(invalid_layout(KvLayout { kv_planes: 3, ..good.clone() }).contains("kv_planes"));
        let mut order = FLASH_ATTN;
        order[3] = Dim::Block;
        assert!(invalid_layout(KvLayout { order, ..good.clone() }).contains("lacks Token"));
        let order = [Dim::Kv, Dim::Layer, Dim::Block, Dim::Token, Dim::Head, Dim::Channel];
        assert!(invalid_layout(KvLayout { order, ..good.clone() }).contains("start with Layer"));
        KvLayout { order, tensor_per_layer: false, ..good }.validate().unwrap();
    }

    #[test]
    fn validate_rejects_overflow() {
        let l = KvLayout { num_blocks: u32::MAX, head_size: u32::MAX, ..flash_attn(32, 1) };
        let err = l.validate().unwrap_err();
        assert_eq!(err.code(), ErrorCode::LayoutOverflow);
        assert!(matches!(layout_error(err), LayoutError::Overflow));
        let err = l.regions(&Selection::blocks(&l, &[0])).unwrap_err();
        assert!(matches!(layout_error(err), LayoutError::Overflow));
    }

    #[test]
    fn regions_reject_bad_selections() {
        let l = flash_attn(4, 10);
        let err = l.regions(&Selection::blocks(&l, &[3, 10])).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BlockOutOfRange);
        assert!(matches!(layout_error(err), LayoutError::BlockOutOfRange { block: 10, num_blocks: 10 }));
        for (layers, heads) in [(0..4, 3..3), (0..5, 0..8), (2..2, 0..8), (0..4, 4..9)] {
            let sel = Selection { blocks: &[1], layers: layers.clone(), heads: heads.clone() };
            let err = l.regions(&sel).unwrap_err();
            assert_eq!(err.code(), ErrorCode::LayoutInvalid, "{layers:?} {heads:?}");
        }
        assert_eq!(l.regions(&Selection::blocks(&l, &[])).unwrap(), Vec::new());
    }

    #[test]
    fn pair_rejects_mismatched_shapes() {
        let a = flash_attn(2, 10);
        let incompatible = |b: &KvLayout, sa: &Selection, sb: &Selection| {
            let err = KvLayout::pair(&a, sa, b, sb).unwrap_err();
            assert_eq!(err.code(), ErrorCode::LayoutIncompatible);
            match layout_error(err) {
                LayoutError::Incompatible(why) => why,
                other => panic!("expected Incompatible, got {other:?}"),
            }
        };
        let b = KvLayout { head_size: 64, ..a.clone() };
        let why = incompatible(&b, &Selection::blocks(&a, &[1]), &Selection::blocks(&b, &[1]));
        assert!(why.contains("head_size"), "{why}");
        let why = incompatible(&a, &Selection::blocks(&a, &[1]), &Selection::blocks(&a, &[1, 2]));
        assert!(why.contains("block count"), "{why}");
        let b = KvLayout { num_kv_heads: 4, ..a.clone() };
        let why = incompatible(&b, &Selection::blocks(&a, &[1]), &Selection::blocks(&b, &[1]));
        assert!(why.contains("head count"), "{why}");
        let b = KvLayout { num_layers: 3, ..a.clone() };
        let why = incompatible(&b, &Selection::blocks(&a, &[1]), &Selection::blocks(&b, &[1]));
        assert!(why.contains("layer count"), "{why}");
        // A layer sub-range of the same length pairs fine.
        let sb = Selection { layers: 1..3, ..Selection::blocks(&b, &[1]) };
        KvLayout::pair(&a, &Selection::blocks(&a, &[1]), &b, &sb).unwrap();
    }

    #[test]
    fn check_compatible_names_the_field() {
        let a = flash_attn(2, 10);
        a.check_compatible(&KvLayout { num_blocks: 5, order: [Dim::Layer; 6], ..a.clone() }).unwrap();
        for (b, field) in [
            (KvLayout { block_size: 32, ..a.clone() }, "block_size"),
            (KvLayout { dtype_bytes: 4, ..a.clone() }, "dtype_bytes"),
            (KvLayout { kv_planes: 1, ..a.clone() }, "kv_planes"),
            (KvLayout { num_layers: 3, ..a.clone() }, "num_layers"),
        ] {
            match layout_error(a.check_compatible(&b).unwrap_err()) {
                LayoutError::Incompatible(why) => assert!(why.contains(field), "{why}"),
                other => panic!("expected Incompatible, got {other:?}"),
            }
        }
    }

    #[test]
    fn heads_for_rank_splits_and_replicates() {
        assert_eq!(heads_for_rank(8, 1, 0).unwrap(), 0..8);
        assert_eq!(heads_for_rank(8, 2, 1).unwrap(), 4..8);
        assert_eq!(heads_for_rank(8, 8, 5).unwrap(), 5..6);
        assert_eq!(heads_for_rank(2, 8, 3).unwrap(), 0..1);
        assert_eq!(heads_for_rank(2, 8, 4).unwrap(), 1..2);
        for (total, tp, rank) in [(8, 3, 0), (3, 8, 0), (8, 2, 2), (0, 1, 0), (8, 0, 0)] {
            let err = heads_for_rank(total, tp, rank).unwrap_err();
            assert_eq!(err.code(), ErrorCode::LayoutInvalid, "{total} {tp} {rank}");
        }
    }
}
