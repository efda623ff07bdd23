//! Host copy engine throughput: `HostDevice::copy_batch` + wait against one thread's
//! `copy_nonoverlapping` of the same bytes (the memcpy limit of a single core).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvferry::deadline::Deadline;
use kvferry::memory::host::{HostAllocOptions, HostBuffer, HostDevice};
use kvferry::memory::{CopyOp, Device};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// (ops, bytes per op)
const CASES: [(usize, usize); 4] = [(64, 16 * KIB), (64, 256 * KIB), (16, 4 * MIB), (1, 64 * MIB)];

fn label(count: usize, len: usize) -> String {
    if len >= MIB { format!("{count}x{}MiB", len / MIB) } else { format!("{count}x{}KiB", len / KIB) }
}

fn host_copy(c: &mut Criterion) {
    let device = HostDevice::new().expect("host device");
    // Unpinned: RLIMIT_MEMLOCK is often far below the buffers' size; pinning does not change copy speed.
    let options = HostAllocOptions::new().with_pin(false).with_populate(true);
    let mut group = c.benchmark_group(format!("host_copy/{}threads", device.threads()));
    group.sample_size(20);
    for (count, len) in CASES {
        let total = count * len;
        let src = HostBuffer::alloc(total, &options).expect("source buffer");
        let dst = HostBuffer::alloc(total, &options).expect("destination buffer");
        src.fill(0x5a);
        let op = |i: usize, j: usize| CopyOp {
            src: (src.as_ptr() as usize + i * len) as u64,
            dst: (dst.as_ptr() as usize + j * len) as u64,
            len: len as u64,
        };
        // Contiguous ops merge into one copy; reversed destinations keep them apart.
        let layouts = [
            ("contiguous", (0..count).map(|i| op(i, i)).collect::<Vec<_>>()),
            ("scattered", (0..count).map(|i| op(i, count - 1 - i)).collect()),
        ];
        group.throughput(Throughput::Bytes(total as u64));
        for (layout, ops) in &layouts {
            group.bench_function(format!("copy_batch_{layout}/{}", label(count, len)), |b| {
                b.iter(|| {
                    // SAFETY: both buffers outlive the wait and do not overlap.
                    let fence = unsafe { device.copy_batch(black_box(ops)) }.expect("valid batch");
                    fence.wait(Deadline::after(Duration::from_secs(10))).expect("copy completes");
                })
            });
        }
        group.bench_function(format!("memcpy_1thread/{}", label(count, len)), |b| {
            b.iter(|| {
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(black_box(src.as_ptr()), dst.as_ptr(), total) };
            })
        });
    }
    group.finish();
}

criterion_group!(benches, host_copy);
criterion_main!(benches);
