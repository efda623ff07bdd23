//! Two agents in one process over TCP loopback, through the public API only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvferry_core::memory::host::{HostAllocOptions, HostBuffer};
use kvferry_core::metadata::AgentMetadata;
use kvferry_core::transport::tcp::TcpConfig;
use kvferry_core::{
    Agent, AgentConfig, Deadline, ErrorCode, LocalDescs, MemKind, MemRegion, PreparedList, RemoteDescs,
    TransferRequest, TransferStatus,
};

const BLOCK: usize = 4096;
const BLOCKS: usize = 32;

/// TCP only: these tests are about the TCP transport (same-host agents would otherwise use shm).
fn agent(name: &str) -> Agent {
    Agent::new(AgentConfig { shm: None, ..AgentConfig::new(name) }).unwrap()
}

fn buffer(seed: u8) -> Arc<HostBuffer> {
    let b =
        Arc::new(HostBuffer::alloc(BLOCK * BLOCKS, &HostAllocOptions { pin: false, ..Default::default() }).unwrap());
    let data: Vec<u8> = (0..b.len()).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    b.write_at(0, &data).unwrap();
    b
}

fn blocks(buf: &HostBuffer) -> Vec<MemRegion> {
    (0..BLOCKS).map(|i| MemRegion::host(unsafe { buf.as_ptr().add(i * BLOCK) }, BLOCK)).collect()
}

fn block_of(buf: &HostBuffer, i: usize) -> Vec<u8> {
    buf.to_vec()[i * BLOCK..(i + 1) * BLOCK].to_vec()
}

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(10))
}

/// An initiator and a target, each with one registered buffer, the target known to the initiator.
struct Pair {
    initiator: Agent,
    target: Agent,
    local_buf: Arc<HostBuffer>,
    remote_buf: Arc<HostBuffer>,
    local: LocalDescs,
    remote: RemoteDescs,
    _regs: Vec<kvferry_core::Registration>,
}

fn pair() -> Pair {
    let (initiator, target) = (agent("initiator"), agent("target"));
    let (local_buf, remote_buf) = (buffer(1), buffer(2));
    let regs = vec![initiator.register(local_buf.clone()).unwrap(), target.register(remote_buf.clone()).unwrap()];
    let peer = initiator.add_peer(&target.metadata()).unwrap();
    assert_eq!(peer, "target");
    let local = initiator.prepare_local(&blocks(&local_buf)).unwrap();
    let remote = initiator.prepare_remote("target", &blocks(&remote_buf)).unwrap();
    Pair { initiator, target, local_buf, remote_buf, local, remote, _regs: regs }
}

#[test]
fn read_and_write_selected_blocks_byte_exact() {
    let p = pair();
    let before_remote = p.remote_buf.to_vec();
    // Scattered picks: local 0,1,2 ← remote 7,3,30.
    let xfer = p.initiator.read(&p.local, &[0, 1, 2], &p.remote, &[7, 3, 30], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.poll(), TransferStatus::Done);
    assert_eq!(xfer.bytes(), 3 * BLOCK as u64);
    for (l, r) in [(0, 7), (1, 3), (2, 30)] {
        assert_eq!(block_of(&p.local_buf, l), block_of(&p.remote_buf, r));
    }
    // And back: local 10,11 → remote 0,1.
    p.initiator.write(&p.local, &[10, 11], &p.remote, &[0, 1], soon()).unwrap().wait().unwrap();
    assert_eq!(block_of(&p.remote_buf, 0), block_of(&p.local_buf, 10));
    assert_eq!(block_of(&p.remote_buf, 1), block_of(&p.local_buf, 11));
    assert_eq!(p.remote_buf.to_vec()[2 * BLOCK..], before_remote[2 * BLOCK..], "nothing else changed");
}

#[test]
fn contiguous_pairs_coalesce_into_one_op() {
    let p = pair();
    let idx: Vec<usize> = (0..BLOCKS).collect();
    let xfer = p.initiator.read(&p.local, &idx, &p.remote, &idx, soon()).unwrap();
    assert_eq!(xfer.ops(), 1);
    xfer.wait().unwrap();
    assert_eq!(p.local_buf.to_vec(), p.remote_buf.to_vec());
    let rev: Vec<usize> = idx.iter().rev().copied().collect();
    let xfer = p.initiator.read(&p.local, &idx, &p.remote, &rev, soon()).unwrap();
    assert_eq!(xfer.ops(), BLOCKS);
    xfer.wait().unwrap();
}

#[test]
fn large_batches_split_across_streams_byte_exact() {
    let (initiator, target) = (agent("big-initiator"), agent("big-target"));
    let len = 48 << 20;
    let opts = HostAllocOptions { pin: false, ..Default::default() };
    let (src, dst) =
        (Arc::new(HostBuffer::alloc(len, &opts).unwrap()), Arc::new(HostBuffer::alloc(len, &opts).unwrap()));
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    src.write_at(0, &data).unwrap();
    let _regs = (initiator.register(dst.clone()).unwrap(), target.register(src.clone()).unwrap());
    initiator.add_peer(&target.metadata()).unwrap();
    // One 48 MiB op: cut into frames over both streams.
    let local = initiator.prepare_local(&[dst.region()]).unwrap();
    let remote = initiator.prepare_remote("big-target", &[src.region()]).unwrap();
    initiator.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap();
    assert!(dst.to_vec() == data);
}

#[test]
fn notifications_arrive_after_the_data() {
    let p = pair();
    let xfer = p
        .initiator
        .post(TransferRequest {
            op: kvferry_core::Op::Write,
            local: &p.local,
            local_indices: &[5],
            remote: &p.remote,
            remote_indices: &[6],
            notification: Some(b"req-1:done"),
            deadline: soon(),
        })
        .unwrap();
    xfer.wait().unwrap();
    let notes = p.target.wait_notifications(soon());
    assert_eq!(notes.len(), 1);
    assert_eq!((notes[0].from.as_str(), notes[0].data.as_slice()), ("initiator", &b"req-1:done"[..]));
    // Delivered after the data: the block is already in place when the notification is read.
    assert_eq!(block_of(&p.remote_buf, 6), block_of(&p.local_buf, 5));

    p.initiator.notify("target", b"bare", soon()).unwrap().wait().unwrap();
    assert_eq!(p.target.wait_notifications(soon())[0].data, b"bare");
    assert!(p.target.take_notifications().is_empty());
}

#[test]
fn descriptor_errors_are_distinct_and_local() {
    let p = pair();
    let stranger = buffer(9);
    let d = |addr: u64, len: u64| MemRegion { addr, len, kind: MemKind::Host };
    let base = p.local_buf.as_ptr() as u64;
    let cases = [
        (p.initiator.prepare_local(&[stranger.region()]).unwrap_err(), ErrorCode::NotRegistered),
        (p.initiator.prepare_local(&[d(base, 0)]).unwrap_err(), ErrorCode::ZeroLength),
        (p.initiator.prepare_local(&[d(u64::MAX - 10, 100)]).unwrap_err(), ErrorCode::RangeOverflow),
        (p.initiator.prepare_local(&[d(base + 8, (BLOCK * BLOCKS) as u64)]).unwrap_err(), ErrorCode::NotRegistered),
        (p.initiator.prepare_remote("target", &[stranger.region()]).unwrap_err(), ErrorCode::RemoteRegionUnknown),
        (p.initiator.prepare_remote("nobody", &blocks(&p.remote_buf)).unwrap_err(), ErrorCode::UnknownPeer),
    ];
    for (err, expected) in cases {
        assert_eq!(err.code(), expected, "{err}");
    }
    let e = p.initiator.read(&p.local, &[0], &p.remote, &[BLOCKS], soon()).err().unwrap();
    assert_eq!(e.code(), ErrorCode::DescIndexOutOfRange);
    let half = p.initiator.prepare_local(&[MemRegion::host(p.local_buf.as_ptr(), BLOCK / 2)]).unwrap();
    let e = p.initiator.read(&half, &[0], &p.remote, &[0], soon()).err().unwrap();
    assert_eq!(e.code(), ErrorCode::LengthMismatch);
    let e = p.initiator.read(&p.local, &[], &p.remote, &[], soon()).err().unwrap();
    assert_eq!(e.code(), ErrorCode::EmptyTransfer);
    // Swapped lists do not compile in Rust; front ends that hold both in one type (Python, C) ask
    // PreparedList for the kind they need and get one error for the other.
    let (local, remote) = (PreparedList::Local(p.local.clone()), PreparedList::Remote(p.remote.clone()));
    assert_eq!(local.remote().unwrap_err().code(), ErrorCode::InvalidArgument);
    assert_eq!(remote.local().unwrap_err().code(), ErrorCode::InvalidArgument);
    assert_eq!((local.local().unwrap().len(), remote.peer()), (p.local.len(), Some(p.remote.peer())));
}

#[test]
fn metadata_errors_are_distinct() {
    let a = agent("md");
    let good = agent("md-peer").metadata();
    let mut wrong_version = good.clone();
    wrong_version[4] = 99;
    let mut corrupt = good.clone();
    *corrupt.last_mut().unwrap() ^= 0xff;
    let cases = [
        (&good[..10], ErrorCode::MetadataTruncated),
        (&b"hello world, not metadata"[..], ErrorCode::MetadataBadMagic),
        (&wrong_version[..], ErrorCode::MetadataVersion),
        (&corrupt[..], ErrorCode::MetadataCorrupt),
    ];
    for (bytes, expected) in cases {
        let err = a.add_peer(bytes).unwrap_err();
        assert_eq!(err.code(), expected, "{err}");
    }
    assert!(a.peers().is_empty());
    assert_eq!(a.add_peer(&a.metadata()).unwrap_err().code(), ErrorCode::InvalidArgument);
}

#[test]
fn the_target_rejects_what_lying_metadata_allows() {
    let p = pair();
    // Metadata that claims a larger region and a different key than the target registered.
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "liar".into();
    md.regions[0].region.len *= 2;
    let reg = p.target.register(buffer(3)).unwrap();
    let _ = reg; // keeps the target's generation moving; its region is not in `md`
    p.initiator.add_peer(&md.encode()).unwrap();
    let far = MemRegion {
        addr: p.remote_buf.as_ptr() as u64 + (BLOCK * BLOCKS) as u64,
        len: BLOCK as u64,
        kind: MemKind::Host,
    };
    let remote = p.initiator.prepare_remote("liar", &[far]).unwrap();
    let e = p.initiator.read(&p.local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteOutOfRange, "{e}");

    md.regions[0].keys[0].1[0] ^= 1;
    md.generation += 1;
    p.initiator.add_peer(&md.encode()).unwrap();
    let remote = p.initiator.prepare_remote("liar", &blocks(&p.remote_buf)).unwrap();
    let e = p.initiator.write(&p.local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{e}");

    // The target keeps serving honest requests.
    p.initiator.read(&p.local, &[0], &p.remote, &[1], soon()).unwrap().wait().unwrap();
}

#[test]
fn a_dropped_registration_is_revoked_for_peers() {
    let (initiator, target) = (agent("i"), agent("t"));
    let (local_buf, remote_buf) = (buffer(1), buffer(2));
    let _local_reg = initiator.register(local_buf.clone()).unwrap();
    let remote_reg = target.register(remote_buf.clone()).unwrap();
    initiator.add_peer(&target.metadata()).unwrap();
    let local = initiator.prepare_local(&blocks(&local_buf)).unwrap();
    let remote = initiator.prepare_remote("t", &blocks(&remote_buf)).unwrap();
    drop(remote_reg);
    let e = initiator.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteUnknownKey);
    // New metadata no longer lists the region: the prepared list is stale, and a fresh one fails.
    initiator.add_peer(&target.metadata()).unwrap();
    assert_eq!(initiator.read(&local, &[0], &remote, &[0], soon()).err().unwrap().code(), ErrorCode::StaleDescriptors);
    assert_eq!(initiator.prepare_remote("t", &blocks(&remote_buf)).unwrap_err().code(), ErrorCode::RemoteRegionUnknown);
}

#[test]
fn a_dropped_local_registration_invalidates_prepared_lists() {
    let p = pair();
    let extra = buffer(4);
    let reg = p.initiator.register(extra.clone()).unwrap();
    let local = p.initiator.prepare_local(&blocks(&extra)).unwrap();
    drop(reg);
    let e = p.initiator.read(&local, &[0], &p.remote, &[0], soon()).err().unwrap();
    assert_eq!(e.code(), ErrorCode::NotRegistered);
}

#[test]
fn an_unreachable_peer_fails_fast_and_other_peers_still_work() {
    let p = pair();
    let ghost = agent("ghost");
    let ghost_buf = buffer(5);
    let ghost_reg = ghost.register(ghost_buf.clone()).unwrap();
    p.initiator.add_peer(&ghost.metadata()).unwrap();
    let remote = p.initiator.prepare_remote("ghost", &blocks(&ghost_buf)).unwrap();
    drop(ghost_reg);
    drop(ghost); // its listener closes: connecting is refused
    let started = Instant::now();
    let e = p.initiator.read(&p.local, &[0], &remote, &[0], Deadline::after(Duration::from_secs(30))).unwrap().wait();
    assert_eq!(e.unwrap_err().code(), ErrorCode::PeerUnreachable);
    assert!(started.elapsed() < Duration::from_secs(5), "failed after {:?}", started.elapsed());
    p.initiator.read(&p.local, &[0], &p.remote, &[0], soon()).unwrap().wait().unwrap();
}

/// A peer whose endpoint is a listener that accepts (the kernel does) but never speaks.
fn silent_peer(p: &Pair) -> (std::net::TcpListener, RemoteDescs) {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "silent".into();
    md.endpoints[0].address = silent.local_addr().unwrap().to_string();
    p.initiator.add_peer(&md.encode()).unwrap();
    (silent, p.initiator.prepare_remote("silent", &blocks(&p.remote_buf)).unwrap())
}

#[test]
fn a_peer_that_never_answers_fails_at_the_deadline() {
    let p = pair();
    let (_silent, remote) = silent_peer(&p);
    let started = Instant::now();
    let xfer = p.initiator.read(&p.local, &[0], &remote, &[0], Deadline::after(Duration::from_millis(300))).unwrap();
    let e = xfer.wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::Timeout, "{e}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(290) && waited < Duration::from_secs(3), "{waited:?}");
    assert!(matches!(xfer.poll(), TransferStatus::Failed(_)));
}

#[test]
fn cancel_stops_a_transfer_that_cannot_progress() {
    let p = pair();
    let (_silent, remote) = silent_peer(&p);
    let xfer = p.initiator.read(&p.local, &[0], &remote, &[0], Deadline::after(Duration::from_millis(500))).unwrap();
    xfer.cancel();
    assert!(matches!(xfer.poll(), TransferStatus::Failed(_)));
    let e = xfer.wait().unwrap_err();
    assert!(matches!(e.code(), ErrorCode::Cancelled | ErrorCode::Timeout), "{e}");
}

#[test]
fn peers_find_each_other_through_the_side_channel() {
    let target = agent("sc-target");
    let buf = buffer(7);
    let _reg = target.register(buf.clone()).unwrap();
    let addr = target.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap();
    let initiator =
        Agent::new(AgentConfig { tcp: Some(TcpConfig::default()), shm: None, ..AgentConfig::new("sc-initiator") })
            .unwrap();
    let peer = initiator.connect_peer(&addr.to_string(), soon()).unwrap();
    assert_eq!(peer, "sc-target");
    assert_eq!(initiator.peer_metadata(&peer).unwrap().regions[0].region, buf.region());
    // The exchange also told the target about the initiator.
    assert_eq!(target.peers(), vec!["sc-initiator".to_string()]);

    let e = initiator.connect_peer("127.0.0.1:1", soon()).unwrap_err();
    assert_eq!(e.code(), ErrorCode::PeerUnreachable);
}

#[test]
fn concurrent_transfers_from_many_threads_stay_byte_exact() {
    let p = pair();
    let (local, remote) = (&p.local, &p.remote);
    std::thread::scope(|scope| {
        for t in 0..4usize {
            let initiator = p.initiator.clone();
            scope.spawn(move || {
                // Each thread owns 8 local blocks; remote blocks are shared read-only sources.
                for round in 0..25usize {
                    let mine: Vec<usize> = (t * 8..t * 8 + 8).collect();
                    let theirs: Vec<usize> = (0..8).map(|i| (i * 5 + round + t) % BLOCKS).collect();
                    initiator.read(local, &mine, remote, &theirs, soon()).unwrap().wait().unwrap();
                }
            });
        }
    });
    // The last round of each thread decides what its blocks hold.
    for t in 0..4usize {
        for i in 0..8usize {
            assert_eq!(block_of(&p.local_buf, t * 8 + i), block_of(&p.remote_buf, (i * 5 + 24 + t) % BLOCKS));
        }
    }
}

#[test]
fn the_side_channel_survives_garbage_and_keeps_answering() {
    use std::io::{Read, Write};
    let target = agent("sc-garbage");
    let addr = target.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(reply.starts_with(b"KVFA"), "a bad request gets the handshake's refusal: {reply:?}");
    let md = kvferry_core::side_channel::exchange(&default_auth(), &addr.to_string(), None, soon()).unwrap();
    assert_eq!(AgentMetadata::decode(&md).unwrap().name, "sc-garbage");
    // An exchange carrying corrupt metadata is refused with the reason.
    let e =
        kvferry_core::side_channel::exchange(&default_auth(), &addr.to_string(), Some(b"KVFMxx"), soon()).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Protocol);
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(target.peers().is_empty());
}

fn default_auth() -> kvferry_core::Auth {
    kvferry_core::Auth::resolve(&kvferry_core::AuthConfig::default()).unwrap()
}
