//! Two agents in one process over libfabric's software providers (`tcp;ofi_rxm` and `shm`), which
//! run the same code path as RDMA NICs.

use std::sync::Arc;
use std::time::Duration;

use super::{FabricConfig, FabricTransport};
use crate::auth::Auth;
use crate::memory::host::{HostAllocOptions, HostBuffer};
use crate::metadata::AgentMetadata;
use crate::transport::{Batch, Completion, NotificationQueue, Op, RemoteRegion, Transport, TransportKind, XferOp};
use crate::{Agent, AgentConfig, Deadline, ErrorCode, MemRegion};

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(20))
}

fn config(provider: &str) -> FabricConfig {
    FabricConfig { provider: Some(provider.into()), ..FabricConfig::default() }
}

fn agent(name: &str, provider: &str) -> Agent {
    Agent::new(AgentConfig { tcp: None, shm: None, fabric: Some(config(provider)), ..AgentConfig::new(name) }).unwrap()
}

fn buffer(len: usize) -> Arc<HostBuffer> {
    Arc::new(HostBuffer::alloc(len, &HostAllocOptions { pin: false, ..Default::default() }).unwrap())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(seed as u64).to_le_bytes()[1]).collect()
}

/// Both ways between two agents: READ and WRITE of scattered blocks, then a notification that
/// arrives after the data.
fn move_blocks(provider: &str) {
    const BLOCK: usize = 16 * 1024;
    const N: usize = 32;
    let (a, b) = (agent(&format!("{provider}-a"), provider), agent(&format!("{provider}-b"), provider));
    let (abuf, bbuf) = (buffer(BLOCK * N), buffer(BLOCK * N));
    bbuf.write_at(0, &pattern(BLOCK * N, 7)).unwrap();
    let (_ra, _rb) = (a.register(abuf.clone()).unwrap(), b.register(bbuf.clone()).unwrap());
    let peer = a.add_peer(&b.metadata()).unwrap();
    b.add_peer(&a.metadata()).unwrap();
    let blocks = |buf: &HostBuffer| -> Vec<MemRegion> {
        (0..N).map(|i| MemRegion::host(unsafe { buf.as_ptr().add(i * BLOCK) }, BLOCK)).collect()
    };
    let local = a.prepare_local(&blocks(&abuf)).unwrap();
    let remote = a.prepare_remote(&peer, &blocks(&bbuf)).unwrap();
    // Local block i ← remote block N-1-i: nothing coalesces.
    let all: Vec<usize> = (0..N).collect();
    let reversed: Vec<usize> = (0..N).rev().collect();
    a.read(&local, &all, &remote, &reversed, soon()).unwrap().wait().unwrap();
    let (got, want) = (abuf.to_vec(), pattern(BLOCK * N, 7));
    for i in 0..N {
        let j = N - 1 - i;
        assert!(got[i * BLOCK..(i + 1) * BLOCK] == want[j * BLOCK..(j + 1) * BLOCK], "{provider}: block {i}");
    }

    abuf.write_at(0, &pattern(BLOCK * N, 42)).unwrap();
    let mut req = crate::TransferRequest::new(Op::Write, (&local, &all), (&remote, &reversed), soon());
    req.notification = Some(b"blocks are in");
    a.post(req).unwrap().wait().unwrap();
    let notes = b.wait_notifications(soon());
    assert_eq!(notes.len(), 1, "{provider}");
    assert_eq!((notes[0].from.as_str(), notes[0].data.as_slice()), (a.name(), &b"blocks are in"[..]));
    let (got, want) = (bbuf.to_vec(), pattern(BLOCK * N, 42));
    for i in 0..N {
        let j = N - 1 - i;
        assert!(got[j * BLOCK..(j + 1) * BLOCK] == want[i * BLOCK..(i + 1) * BLOCK], "{provider}: block {i}");
    }
}

#[test]
fn tcp_provider_moves_blocks_both_ways_byte_exact() {
    move_blocks("tcp");
}

#[test]
fn shm_provider_moves_blocks_both_ways_byte_exact() {
    move_blocks("shm");
}

/// A key the target never issued, or a range beyond its registration, is refused by the owner
/// with a typed rejection before any access; nothing changes and honest requests keep working.
fn forged_key(provider: &str) {
    let (a, b) = (agent(&format!("{provider}-honest"), provider), agent(&format!("{provider}-t"), provider));
    let (abuf, bbuf) = (buffer(4096), buffer(8192));
    bbuf.write_at(0, &pattern(8192, 3)).unwrap();
    let (_ra, _rb) = (a.register(abuf.clone()).unwrap(), b.register(bbuf.clone()).unwrap());
    let honest = a.add_peer(&b.metadata()).unwrap();
    let local = a.prepare_local(&[abuf.region()]).unwrap();
    abuf.write_at(0, &[0xee; 4096]).unwrap();

    let mut md = AgentMetadata::decode(&b.metadata()).unwrap();
    md.name = format!("{provider}-forged");
    md.regions[0].region.len *= 4; // claims memory beyond the registration
    let forged = a.add_peer(&md.encode()).unwrap();
    let beyond = MemRegion::host(unsafe { bbuf.as_ptr().add(8192) }, 4096);
    let remote = a.prepare_remote(&forged, &[beyond]).unwrap();
    let e = a.write(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteOutOfRange, "{provider}: {e}");

    let key = &mut md.regions[0].keys.iter_mut().find(|(k, _)| *k == TransportKind::Fabric).unwrap().1;
    key[5] ^= 0x5a; // inside the rail-0 key
    md.generation += 1;
    a.add_peer(&md.encode()).unwrap();
    let remote = a.prepare_remote(&forged, &[MemRegion::host(bbuf.as_ptr(), 4096)]).unwrap();
    for _ in 0..2 {
        // The second time the refusal is already known and nothing is sent.
        let e = a.write(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
        assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{provider}: {e}");
        assert!(e.to_string().contains(&forged), "the error names the peer: {e}");
    }
    let e = a.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{provider}: {e}");
    assert_eq!(bbuf.to_vec(), pattern(8192, 3), "{provider}: the refused writes changed nothing");

    let remote = a.prepare_remote(&honest, &[MemRegion::host(bbuf.as_ptr(), 4096)]).unwrap();
    a.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap();
    assert_eq!(abuf.to_vec(), pattern(8192, 3)[..4096], "{provider}");
}

#[test]
fn tcp_provider_refuses_a_forged_key() {
    forged_key("tcp");
}

#[test]
fn shm_provider_refuses_a_forged_key() {
    forged_key("shm");
}

#[test]
fn large_batches_stripe_across_two_rails_byte_exact() {
    let two_rails = FabricConfig { rails: 2, stripe_min_bytes: 64 * 1024, ..config("tcp") };
    let (qa, qb) = (Arc::new(NotificationQueue::default()), Arc::new(NotificationQueue::default()));
    let a = FabricTransport::start("striper", two_rails.clone(), Auth::disabled(), qa).unwrap();
    if a.domains().len() < 2 {
        eprintln!("skipped: the tcp provider lists one domain here ({:?}); striping needs two", a.domains());
        return;
    }
    let b = FabricTransport::start("striped", two_rails, Auth::disabled(), qb).unwrap();
    const LEN: usize = 8 << 20;
    let (abuf, bbuf) = (buffer(LEN), buffer(LEN));
    abuf.write_at(0, &pattern(LEN, 9)).unwrap();
    a.register(abuf.region(), Arc::new(())).unwrap();
    let key = b.register(bbuf.region(), Arc::new(())).unwrap();
    let link = a.link("striped", &b.endpoint(), vec![RemoteRegion { region: bbuf.region(), key }]).unwrap();
    let post = |ops: Vec<XferOp>, len: u64| {
        let completion = Arc::new(Completion::new("striped", Op::Write, len, None, soon()));
        link.post(Batch { ops, completion: completion.clone(), keep_alive: Arc::new(()) }).unwrap();
        completion.wait().unwrap();
    };
    // The first batch on a region has the owner confirm it, on one rail.
    let (local_base, remote_base) = (abuf.as_ptr() as u64, bbuf.as_ptr() as u64);
    post(vec![XferOp { local_addr: local_base, remote_region: 0, remote_addr: remote_base, len: 4096 }], 4096);
    let before = a.rail_bytes();
    // Two ops of 4 MiB: one single op is also cut between the rails.
    let ops: Vec<XferOp> = [(0u64, LEN as u64 / 2), (LEN as u64 / 2, LEN as u64 / 2)]
        .iter()
        .map(|&(off, len)| XferOp {
            local_addr: local_base + off,
            remote_region: 0,
            remote_addr: remote_base + (LEN as u64 / 2 - off),
            len,
        })
        .collect();
    post(ops, LEN as u64);
    let per_rail: Vec<u64> = a.rail_bytes().iter().zip(&before).map(|(after, before)| after - before).collect();
    assert_eq!(per_rail.iter().sum::<u64>(), LEN as u64);
    assert!(per_rail.iter().all(|&b| b > 0), "both rails carried data: {per_rail:?}");
    let (got, want) = (bbuf.to_vec(), pattern(LEN, 9));
    assert!(got[LEN / 2..] == want[..LEN / 2] && got[..LEN / 2] == want[LEN / 2..], "striped bytes differ");
}

#[test]
fn unknown_provider_is_a_typed_error_listing_what_is_here() {
    let e = FabricTransport::start("x", config("no-such-provider"), Auth::disabled(), Arc::default()).err().unwrap();
    assert_eq!(e.code(), ErrorCode::FabricNoProvider);
    assert!(e.to_string().contains("no-such-provider") && e.to_string().contains("tcp"), "{e}");
}

#[test]
fn peers_on_another_provider_are_refused_clearly() {
    let (a, b) = (agent("on-tcp", "tcp"), agent("on-shm", "shm"));
    let e = a.add_peer(&b.metadata()).unwrap_err();
    assert_eq!(e.code(), ErrorCode::FabricProviderMismatch, "{e}");
}
