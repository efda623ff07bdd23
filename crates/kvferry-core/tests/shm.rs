//! Two agents in one process on the shared-memory transport, through the public API only: both
//! ways of reaching memory (a mapped memfd, cross-memory attach), the owner's checks, and the
//! fallback to TCP.

use std::sync::Arc;
use std::time::Duration;

use kvferry_core::memory::host::{HostAllocOptions, HostBuffer};
use kvferry_core::metadata::AgentMetadata;
use kvferry_core::{Agent, AgentConfig, Deadline, ErrorCode, MemKind, MemRegion, TransportKind};

const BLOCK: usize = 4096;

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(10))
}

fn buffer(len: usize, shareable: bool, seed: u8) -> Arc<HostBuffer> {
    let options = HostAllocOptions::new().with_pin(false).with_shareable(shareable);
    let b = Arc::new(HostBuffer::alloc(len, &options).unwrap());
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
    b.write_at(0, &data).unwrap();
    b
}

fn blocks(buf: &HostBuffer) -> Vec<MemRegion> {
    (0..buf.len() / BLOCK).map(|i| MemRegion::host(unsafe { buf.as_ptr().add(i * BLOCK) }, BLOCK)).collect()
}

fn block_of(buf: &HostBuffer, i: usize) -> Vec<u8> {
    buf.to_vec()[i * BLOCK..(i + 1) * BLOCK].to_vec()
}

struct Pair {
    initiator: Agent,
    target: Agent,
    local_buf: Arc<HostBuffer>,
    remote_buf: Arc<HostBuffer>,
    _regs: Vec<kvferry_core::Registration>,
}

/// The target's memory is shareable (mapped) or plain (cross-memory attach).
fn pair(shareable: bool, blocks: usize) -> Pair {
    let initiator = Agent::new(AgentConfig::new("shm-initiator")).unwrap();
    let target = Agent::new(AgentConfig::new("shm-target")).unwrap();
    let local_buf = buffer(BLOCK * blocks, false, 1);
    let remote_buf = buffer(BLOCK * blocks, shareable, 2);
    let regs = vec![initiator.register(local_buf.clone()).unwrap(), target.register(remote_buf.clone()).unwrap()];
    initiator.add_peer(&target.metadata()).unwrap();
    assert_eq!(initiator.peer_transport("shm-target"), Some(TransportKind::Shm));
    Pair { initiator, target, local_buf, remote_buf, _regs: regs }
}

fn read_and_write_byte_exact(shareable: bool, mode: &str) {
    let p = pair(shareable, 32);
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let remote = p.initiator.prepare_remote("shm-target", &blocks(&p.remote_buf)).unwrap();
    let xfer = p.initiator.read(&local, &[0, 1, 2], &remote, &[7, 3, 9], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!((xfer.transport(), xfer.mode()), (TransportKind::Shm, Some(mode)));
    for (l, r) in [(0, 7), (1, 3), (2, 9)] {
        assert_eq!(block_of(&p.local_buf, l), block_of(&p.remote_buf, r), "read block {l} ← {r}");
    }
    let untouched = block_of(&p.local_buf, 3);
    p.initiator.write(&local, &[3, 4], &remote, &[20, 10], soon()).unwrap().wait().unwrap();
    assert_eq!(block_of(&p.remote_buf, 20), untouched);
    assert_eq!(block_of(&p.remote_buf, 10), block_of(&p.local_buf, 4));
}

#[test]
fn mapped_memory_moves_byte_exact_both_ways() {
    read_and_write_byte_exact(true, "mapped");
}

#[test]
fn cross_memory_attach_moves_byte_exact_both_ways() {
    read_and_write_byte_exact(false, "cross-memory");
}

#[test]
fn large_batches_split_over_copy_threads_byte_exact() {
    for shareable in [true, false] {
        // 16 MiB in 4 KiB blocks, reversed so that none coalesce.
        let p = pair(shareable, 4096);
        let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
        let remote = p.initiator.prepare_remote("shm-target", &blocks(&p.remote_buf)).unwrap();
        let all: Vec<usize> = (0..4096).collect();
        let reversed: Vec<usize> = all.iter().rev().copied().collect();
        p.initiator.read(&local, &all, &remote, &reversed, soon()).unwrap().wait().unwrap();
        let (got, want) = (p.local_buf.to_vec(), p.remote_buf.to_vec());
        for i in 0..4096 {
            let j = 4095 - i;
            assert!(got[i * BLOCK..(i + 1) * BLOCK] == want[j * BLOCK..(j + 1) * BLOCK], "block {i}");
        }
    }
}

#[test]
fn notifications_follow_the_data() {
    let p = pair(true, 4);
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let remote = p.initiator.prepare_remote("shm-target", &blocks(&p.remote_buf)).unwrap();
    let mut req = kvferry_core::TransferRequest::new(
        kvferry_core::Op::Write,
        (&local, &[0, 1, 2, 3]),
        (&remote, &[0, 1, 2, 3]),
        soon(),
    );
    req.notification = Some(b"written");
    p.initiator.post(req).unwrap().wait().unwrap();
    let got = p.target.wait_notifications(soon());
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].from.as_str(), got[0].data.as_slice()), ("shm-initiator", &b"written"[..]));
    assert_eq!(p.remote_buf.to_vec(), p.local_buf.to_vec());
    p.initiator.notify("shm-target", b"alone", soon()).unwrap().wait().unwrap();
    assert_eq!(p.target.wait_notifications(soon())[0].data, b"alone");
}

/// Metadata of the target with a region claimed larger than registered and, after that, a forged
/// key: the owner refuses both, and nothing is written.
fn the_owner_rejects_what_lying_metadata_allows(shareable: bool) {
    let p = pair(shareable, 8);
    let before = p.remote_buf.to_vec();
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "liar".into();
    md.regions[0].region.len *= 2;
    p.initiator.add_peer(&md.encode()).unwrap();
    assert_eq!(p.initiator.peer_transport("liar"), Some(TransportKind::Shm));
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let beyond =
        MemRegion { addr: p.remote_buf.as_ptr() as u64 + 8 * BLOCK as u64, len: BLOCK as u64, kind: MemKind::Host };
    let inside = MemRegion { len: BLOCK as u64, ..p.remote_buf.region() };
    let remote = p.initiator.prepare_remote("liar", &[inside, beyond]).unwrap();
    let e = p.initiator.write(&local, &[0, 1], &remote, &[0, 1], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteOutOfRange, "{e}");
    assert!(e.to_string().contains("descriptor 1"), "{e}");

    let shm_key = md.regions[0].keys.iter_mut().find(|(k, _)| *k == TransportKind::Shm).unwrap();
    shm_key.1[0] ^= 1;
    md.generation += 1;
    p.initiator.add_peer(&md.encode()).unwrap();
    let remote = p.initiator.prepare_remote("liar", &[inside, inside]).unwrap();
    let e = p.initiator.write(&local, &[0, 2], &remote, &[0, 1], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{e}");
    assert!(e.to_string().contains("descriptor 0"), "{e}");
    assert!(p.remote_buf.to_vec() == before, "a rejected write touched the target's memory");
}

#[test]
fn the_owner_rejects_out_of_range_and_forged_descriptors_mapped() {
    the_owner_rejects_what_lying_metadata_allows(true);
}

#[test]
fn the_owner_rejects_out_of_range_and_forged_descriptors_cross_memory() {
    the_owner_rejects_what_lying_metadata_allows(false);
}

#[test]
fn a_dropped_registration_is_revoked_even_after_it_was_mapped() {
    let p = pair(true, 4);
    let extra = buffer(4 * BLOCK, true, 9);
    let reg = p.target.register(extra.clone()).unwrap();
    p.initiator.add_peer(&p.target.metadata()).unwrap();
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let remote = p.initiator.prepare_remote("shm-target", &blocks(&extra)).unwrap();
    p.initiator.read(&local, &[0], &remote, &[1], soon()).unwrap().wait().unwrap();
    assert_eq!(block_of(&p.local_buf, 0), block_of(&extra, 1));
    drop(reg);
    let before = extra.to_vec();
    let e = p.initiator.write(&local, &[2], &remote, &[1], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{e}");
    assert!(extra.to_vec() == before);
}

#[test]
fn a_peer_on_another_host_is_reached_over_tcp() {
    let p = pair(true, 4);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "elsewhere".into();
    let shm = md.endpoints.iter_mut().find(|e| e.kind == TransportKind::Shm).unwrap();
    shm.address = format!("00000000-0000-0000-0000-000000000000{}", &shm.address[36..]);
    p.initiator.add_peer(&md.encode()).unwrap();
    assert_eq!(p.initiator.peer_transport("elsewhere"), Some(TransportKind::Tcp));
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let remote = p.initiator.prepare_remote("elsewhere", &blocks(&p.remote_buf)).unwrap();
    let xfer = p.initiator.read(&local, &[0], &remote, &[3], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!((xfer.transport(), xfer.mode()), (TransportKind::Tcp, None));
    assert_eq!(block_of(&p.local_buf, 0), block_of(&p.remote_buf, 3));
}

#[test]
fn an_unreachable_socket_falls_back_to_tcp() {
    let p = pair(false, 4);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "no-socket".into();
    let shm = md.endpoints.iter_mut().find(|e| e.kind == TransportKind::Shm).unwrap();
    shm.address.push_str("-gone");
    p.initiator.add_peer(&md.encode()).unwrap();
    assert_eq!(p.initiator.peer_transport("no-socket"), Some(TransportKind::Tcp));
}

#[test]
fn a_malformed_shm_endpoint_or_key_is_an_error_when_nothing_else_is_shared() {
    let initiator = Agent::new(AgentConfig { tcp: None, ..AgentConfig::new("shm-only") }).unwrap();
    let p = pair(true, 4);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.endpoints.iter_mut().find(|e| e.kind == TransportKind::Shm).unwrap().address = "no-slashes".into();
    assert_eq!(initiator.add_peer(&md.encode()).unwrap_err().code(), ErrorCode::InvalidArgument);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.regions[0].keys.iter_mut().find(|(k, _)| *k == TransportKind::Shm).unwrap().1.push(0);
    assert_eq!(initiator.add_peer(&md.encode()).unwrap_err().code(), ErrorCode::InvalidArgument);
}
