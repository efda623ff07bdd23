//! Transfers over TCP that stage memory through pinned host bounce buffers on both sides, through
//! the public API only. The same checks run with host memory staged through the host device (here,
//! always) and with GPU memory (where a GPU is present): device → bounce → TCP → bounce → device.

use std::sync::Arc;
use std::time::Duration;

use kvferry_core::memory::host::{HostAllocOptions, HostBuffer};
use kvferry_core::{Agent, AgentConfig, CopyOp, Deadline, Device, HostDevice, MemRegion, Memory, StagingConfig};

/// Not a multiple of the chunk size, so blocks straddle chunk boundaries.
const BLOCK: usize = 48 << 10;
const BLOCKS: usize = 40;
const CHUNK: usize = 64 << 10;

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(30))
}

fn staged_agent(name: &str, devices: Vec<Arc<dyn Device>>, stage_host: bool) -> Agent {
    let staging = StagingConfig { devices, chunk_bytes: CHUNK, stage_host };
    Agent::new(AgentConfig { staging: Some(staging), ..AgentConfig::new(name) }).unwrap()
}

/// Device memory filled with `seed`-dependent bytes, through a host buffer and the device's copies.
fn patterned(device: &dyn Device, seed: u8) -> Arc<dyn Memory> {
    let memory = device.alloc(BLOCK * BLOCKS).unwrap();
    let host = HostBuffer::alloc(BLOCK * BLOCKS, &HostAllocOptions::new()).unwrap();
    let data: Vec<u8> = (0..host.len()).map(|i| ((i / 7) as u8).wrapping_mul(13).wrapping_add(seed)).collect();
    host.write_at(0, &data).unwrap();
    let op = CopyOp { src: host.as_ptr() as u64, dst: memory.region().addr, len: host.len() as u64 };
    unsafe { device.copy_batch(&[op]) }.unwrap().wait(soon()).unwrap();
    memory
}

fn contents(device: &dyn Device, memory: &dyn Memory) -> Vec<u8> {
    let host = HostBuffer::alloc(BLOCK * BLOCKS, &HostAllocOptions::new()).unwrap();
    let op = CopyOp { src: memory.region().addr, dst: host.as_ptr() as u64, len: host.len() as u64 };
    unsafe { device.copy_batch(&[op]) }.unwrap().wait(soon()).unwrap();
    host.to_vec()
}

fn blocks(memory: &dyn Memory) -> Vec<MemRegion> {
    let r = memory.region();
    (0..BLOCKS).map(|i| MemRegion { addr: r.addr + (i * BLOCK) as u64, len: BLOCK as u64, kind: r.kind }).collect()
}

fn block(bytes: &[u8], i: usize) -> &[u8] {
    &bytes[i * BLOCK..(i + 1) * BLOCK]
}

/// Scattered and bulk WRITE and READ between two agents that both stage, byte for byte, with the
/// notification after the data.
fn staged_transfers_are_byte_exact(device: Arc<dyn Device>, stage_host: bool) {
    let initiator = staged_agent("staging-initiator", vec![device.clone()], stage_host);
    let target = staged_agent("staging-target", vec![device.clone()], stage_host);
    let (local_mem, remote_mem) = (patterned(&*device, 1), patterned(&*device, 2));
    let _regs = [initiator.register(local_mem.clone()).unwrap(), target.register(remote_mem.clone()).unwrap()];
    initiator.add_peer(&target.metadata()).unwrap();
    let local = initiator.prepare_local(&blocks(&*local_mem)).unwrap();
    let remote = initiator.prepare_remote("staging-target", &blocks(&*remote_mem)).unwrap();
    let (local_before, remote_before) = (contents(&*device, &*local_mem), contents(&*device, &*remote_mem));

    // Scattered WRITE: local 3,4,5 (one run) and 9 → remote 20,21,22 and 0.
    let mut request = kvferry_core::TransferRequest::new(
        kvferry_core::Op::Write,
        (&local, &[3, 4, 5, 9]),
        (&remote, &[20, 21, 22, 0]),
        soon(),
    );
    request.notification = Some(b"written");
    initiator.post(request).unwrap().wait().unwrap();
    let notes = target.wait_notifications(soon());
    assert_eq!(notes[0].data, b"written");
    let remote_after = contents(&*device, &*remote_mem);
    for (l, r) in [(3, 20), (4, 21), (5, 22), (9, 0)] {
        assert!(block(&remote_after, r) == block(&local_before, l), "remote block {r}");
    }
    assert!(block(&remote_after, 1) == block(&remote_before, 1), "untouched blocks stay");

    // Bulk READ of every block in reverse order: many chunks over both streams.
    let all: Vec<usize> = (0..BLOCKS).collect();
    let reversed: Vec<usize> = all.iter().rev().copied().collect();
    initiator.read(&local, &all, &remote, &reversed, soon()).unwrap().wait().unwrap();
    let local_after = contents(&*device, &*local_mem);
    for i in 0..BLOCKS {
        assert!(block(&local_after, i) == block(&remote_after, BLOCKS - 1 - i), "local block {i}");
    }
}

#[test]
fn host_memory_staged_through_the_host_device_moves_byte_exact() {
    let host: Arc<dyn Device> = Arc::new(HostDevice::with_threads(2).unwrap());
    staged_transfers_are_byte_exact(host, true);
}

/// Device → TCP → device through staging on a GPU, or a printed reason why not.
#[cfg(any(feature = "cuda", feature = "rocm"))]
fn on_gpu_or_skip(device: kvferry_core::Result<Arc<dyn Device>>) {
    match device {
        Ok(device) => staged_transfers_are_byte_exact(device, false),
        Err(e) => println!("skipping GPU staging: {e}"),
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_to_tcp_to_gpu_through_staging_moves_byte_exact() {
    on_gpu_or_skip(kvferry_core::CudaDevice::open(0).map(|d| Arc::new(d) as Arc<dyn Device>));
}

#[cfg(feature = "rocm")]
#[test]
fn rocm_gpu_to_tcp_to_gpu_through_staging_moves_byte_exact() {
    on_gpu_or_skip(kvferry_core::RocmDevice::open(0).map(|d| Arc::new(d) as Arc<dyn Device>));
}
