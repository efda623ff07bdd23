//! Device-to-device transfers between two processes through the `cuda-ipc` transport. The test
//! binary runs itself again as the peer process. Skips, saying why, where no CUDA GPU is present.
#![cfg(feature = "cuda")]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kvferry_core::memory::host::{HostAllocOptions, HostBuffer};
use kvferry_core::transport::cuda_ipc::CudaIpcConfig;
use kvferry_core::{Agent, AgentConfig, CopyOp, CudaDevice, Deadline, Device, MemRegion, Memory, Op, TransferRequest};

const PEER_ENV: &str = "KVFERRY_CUDA_IPC_PEER";
/// One 16-token vLLM block of one layer: 16 tokens x 8 heads x 128 x fp16, K and V.
const BLOCK: usize = 2 * 16 * 8 * 128 * 2;
const BLOCKS: usize = 32;

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(30))
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..BLOCK * BLOCKS).map(|i| ((i / 3) as u8).wrapping_mul(7).wrapping_add(seed)).collect()
}

fn upload(device: &CudaDevice, data: &[u8]) -> Arc<dyn Memory> {
    let memory = device.alloc(data.len()).unwrap();
    let host = HostBuffer::alloc(data.len(), &HostAllocOptions::new()).unwrap();
    host.write_at(0, data).unwrap();
    let op = CopyOp { src: host.as_ptr() as u64, dst: memory.region().addr, len: data.len() as u64 };
    unsafe { device.copy_now(&[op], soon()) }.unwrap();
    memory
}

fn download(device: &CudaDevice, memory: &dyn Memory) -> Vec<u8> {
    let host = HostBuffer::alloc(memory.region().len as usize, &HostAllocOptions::new()).unwrap();
    let op = CopyOp { src: memory.region().addr, dst: host.as_ptr() as u64, len: host.len() as u64 };
    unsafe { device.copy_now(&[op], soon()) }.unwrap();
    host.to_vec()
}

fn ipc_agent(name: &str, device: &CudaDevice) -> Agent {
    let config = AgentConfig { cuda_ipc: Some(CudaIpcConfig { device: device.clone() }), ..AgentConfig::new(name) };
    Agent::new(config).unwrap()
}

fn blocks(region: MemRegion) -> Vec<MemRegion> {
    (0..BLOCKS)
        .map(|i| MemRegion { addr: region.addr + (i * BLOCK) as u64, len: BLOCK as u64, kind: region.kind })
        .collect()
}

#[test]
fn device_blocks_move_between_processes_through_cuda_ipc() {
    if let Ok(side_channel) = std::env::var(PEER_ENV) {
        return peer(&side_channel);
    }
    let device = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => return println!("skipping cuda-ipc between processes: {e}"),
    };
    let owner = ipc_agent("ipc-owner", &device);
    let memory = upload(&device, &pattern(1));
    let _reg = owner.register(memory.clone()).unwrap();
    let addr = owner.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap();

    let status = Command::new(std::env::current_exe().unwrap())
        .args(["device_blocks_move_between_processes_through_cuda_ipc", "--exact", "--nocapture"])
        .env(PEER_ENV, addr.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "the peer process failed: {status}");

    // The peer wrote its blocks 0..4 over ours 28..32, then notified.
    let notes = owner.wait_notifications(soon());
    assert_eq!(notes.first().map(|n| n.data.as_slice()), Some(&b"written"[..]));
    let after = download(&device, &*memory);
    let (ours, theirs) = (pattern(1), pattern(2));
    assert!(after[..28 * BLOCK] == ours[..28 * BLOCK], "blocks the peer did not write are unchanged");
    assert!(after[28 * BLOCK..] == theirs[..4 * BLOCK], "the peer's blocks arrived");
}

/// The second process: reads every block of the owner's memory device to device, checks it, and
/// writes four of its own blocks back with a notification.
fn peer(side_channel: &str) {
    let device = CudaDevice::open(0).unwrap();
    let agent = ipc_agent("ipc-peer", &device);
    let memory = upload(&device, &pattern(2));
    let _reg = agent.register(memory.clone()).unwrap();
    let owner = agent.connect_peer(side_channel, soon()).unwrap();
    let remote_region = agent.peer_metadata(&owner).unwrap().regions[0].region;
    let local = agent.prepare_local(&blocks(memory.region())).unwrap();
    let remote = agent.prepare_remote(&owner, &blocks(remote_region)).unwrap();
    let all: Vec<usize> = (0..BLOCKS).collect();

    let scratch = device.alloc(BLOCK * BLOCKS).unwrap();
    let _scratch_reg = agent.register(scratch.clone()).unwrap();
    let scratch_list = agent.prepare_local(&blocks(scratch.region())).unwrap();
    agent.read(&scratch_list, &all, &remote, &all, soon()).unwrap().wait().unwrap();
    assert!(download(&device, &*scratch) == pattern(1), "read the owner's blocks exactly");

    let mut request = TransferRequest::new(Op::Write, (&local, &[0, 1, 2, 3]), (&remote, &[28, 29, 30, 31]), soon());
    request.notification = Some(b"written");
    agent.post(request).unwrap().wait().unwrap();
}
