//! Two agents (in one process here; normally a prefill and a decode worker) exchange metadata
//! through the side channel, then the decode side reads three KV blocks and tells the prefill side
//! it may free them.
//!
//! Run: `cargo run --example quickstart`

use std::sync::Arc;
use std::time::Duration;

use kvferry::{Agent, AgentConfig, Deadline, HostAllocOptions, HostBuffer, MemRegion};

const BLOCK: usize = 64 * 1024;

fn blocks(buf: &HostBuffer, n: usize) -> Vec<MemRegion> {
    (0..n).map(|i| MemRegion::host(unsafe { buf.as_ptr().add(i * BLOCK) }, BLOCK)).collect()
}

fn main() -> kvferry::Result<()> {
    // Prefill side: owns the KV blocks and serves its metadata on a side channel.
    let prefill = Agent::new(AgentConfig::new("prefill-0"))?;
    let kv = Arc::new(HostBuffer::alloc(16 * BLOCK, &HostAllocOptions::default())?);
    kv.fill(0xAB);
    let _kv_reg = prefill.register(kv.clone())?; // deregistered when dropped
    let side_channel = prefill.serve_side_channel("127.0.0.1:0".parse().unwrap())?;

    // Decode side: finds the prefill agent from host:port alone.
    let decode = Agent::new(AgentConfig::new("decode-0"))?;
    let dst = Arc::new(HostBuffer::alloc(16 * BLOCK, &HostAllocOptions::default())?);
    let _dst_reg = decode.register(dst.clone())?;
    let peer = decode.connect_peer(&side_channel.to_string(), Deadline::after(Duration::from_secs(5)))?;

    // Prepare descriptor lists once; pick blocks by index per request.
    let local = decode.prepare_local(&blocks(&dst, 16))?;
    let remote = decode.prepare_remote(&peer, &blocks(&kv, 16))?;
    let xfer = decode.post(kvferry::TransferRequest {
        op: kvferry::Op::Read,
        local: &local,
        local_indices: &[0, 1, 2],
        remote: &remote,
        remote_indices: &[7, 3, 9],
        notification: Some(b"req-42:done"),
        deadline: Deadline::after(Duration::from_secs(5)),
    })?;
    xfer.wait()?;
    assert!(dst.to_vec()[..3 * BLOCK].iter().all(|&b| b == 0xAB));

    // The notification arrives after the data: the prefill side can free the blocks now.
    for n in prefill.wait_notifications(Deadline::after(Duration::from_secs(5))) {
        println!("{} says {}", n.from, String::from_utf8_lossy(&n.data));
    }
    println!("moved {} bytes in {:?}", xfer.bytes(), xfer.elapsed().unwrap_or_default());
    Ok(())
}
