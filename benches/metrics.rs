//! What the transfer counters cost: one transfer's `started` + `settled` (the only work the data
//! path does for metrics), against an uncontended mutex lock (the cheapest lock a data path could
//! take instead), and a full rendering for a scrape.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use kvferry::Op;
use kvferry::TransportKind;
use kvferry::metrics::Metrics;

fn metrics(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics");
    let m = Metrics::default();
    group.bench_function("record_one_transfer", |b| {
        b.iter(|| m.record_for_bench(black_box(TransportKind::Shm), Op::Read, Duration::from_micros(8), 4096))
    });
    let lock = Mutex::new(0u64);
    group.bench_function("uncontended_mutex", |b| b.iter(|| *lock.lock().unwrap() += black_box(1)));
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        for op in [Op::Read, Op::Write] {
            m.record_for_bench(t, op, Duration::from_millis(1), 1 << 20);
        }
    }
    group.bench_function("render", |b| b.iter(|| black_box(m.render())));
    group.finish();
}

criterion_group!(benches, metrics);
criterion_main!(benches);
