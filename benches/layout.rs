//! Region computation for a Llama-8B-like cache (32 layers, 8 KV heads of 128, 16-token blocks,
//! bf16, one FlashAttention tensor per layer).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kvferry::layout::{Dim, KvLayout, Selection, heads_for_rank};

fn cache(num_kv_heads: u32) -> KvLayout {
    KvLayout {
        num_layers: 32,
        num_blocks: 10_000,
        block_size: 16,
        num_kv_heads,
        head_size: 128,
        dtype_bytes: 2,
        kv_planes: 2,
        order: [Dim::Layer, Dim::Kv, Dim::Block, Dim::Token, Dim::Head, Dim::Channel],
        tensor_per_layer: true,
    }
}

fn bench(c: &mut Criterion) {
    let local = cache(8);
    let contiguous_64: Vec<u32> = (100..164).collect();
    let contiguous_1024: Vec<u32> = (2000..3024).collect();
    // Every other block scattered over the cache, so no two are adjacent.
    let scattered_1024: Vec<u32> = (0..1024).map(|i| (i * 7919) % 5000 * 2).collect();

    for (name, blocks) in
        [("contiguous_64", &contiguous_64), ("contiguous_1024", &contiguous_1024), ("scattered_1024", &scattered_1024)]
    {
        let sel = Selection::blocks(&local, blocks);
        c.bench_function(&format!("regions/{name}"), |b| b.iter(|| local.regions(black_box(&sel)).unwrap()));
        c.bench_function(&format!("pair/{name}"), |b| {
            b.iter(|| KvLayout::pair(&local, black_box(&sel), &local, black_box(&sel)).unwrap())
        });
    }

    // TP 1 → 2: the local rank sends the heads of remote rank 1, which holds 4 heads.
    let remote = cache(4);
    let heads = heads_for_rank(8, 2, 1).unwrap();
    let local_sel = Selection { heads, ..Selection::blocks(&local, &contiguous_64) };
    let remote_sel = Selection::blocks(&remote, &contiguous_1024[..64]);
    c.bench_function("pair/tp1_to_tp2_contiguous_64", |b| {
        b.iter(|| KvLayout::pair(&local, black_box(&local_sel), &remote, black_box(&remote_sel)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
