//! Two agents in one process over libfabric's software providers (`tcp;ofi_rxm` and `shm`), which
//! run the same code path as RDMA NICs.

use std::sync::Arc;
use std::time::Duration;

use super::{FabricConfig, FabricTransport};
use crate::auth::Auth;
use crate::memory::host::{HostAllocOptions, HostBuffer};
use crate::metadata::AgentMetadata;
use crate::sync::Locked;
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
        // SAFETY: block `i < N` starts inside the buffer of `BLOCK * N` bytes.
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
    // SAFETY: one past the end of `bbuf`'s 8192 bytes, an address only (this side never reads it).
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
    a.register(abuf.region(), None).unwrap();
    let key = b.register(bbuf.region(), None).unwrap();
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

fn secret(s: &str) -> crate::AuthConfig {
    crate::AuthConfig::Secret(s.as_bytes().to_vec())
}

const SECRET: &str = "a cluster secret of 32 bytes....";

/// Agents of another cluster: the first batch fails as unauthenticated when the peer's challenge
/// does not prove our secret, and the target's memory is untouched.
fn another_secret(provider: &str) {
    let with = |name: &str, s: &str| {
        let fabric = Some(config(provider));
        Agent::new(AgentConfig { tcp: None, shm: None, fabric, auth: secret(s), ..AgentConfig::new(name) }).unwrap()
    };
    let a = with(&format!("{provider}-ours"), SECRET);
    let b = with(&format!("{provider}-theirs"), "another secret of 32 bytes......");
    let (abuf, bbuf) = (buffer(4096), buffer(4096));
    abuf.write_at(0, &pattern(4096, 1)).unwrap();
    bbuf.write_at(0, &pattern(4096, 2)).unwrap();
    let (_ra, _rb) = (a.register(abuf.clone()).unwrap(), b.register(bbuf.clone()).unwrap());
    let peer = a.add_peer(&b.metadata()).unwrap();
    let local = a.prepare_local(&[abuf.region()]).unwrap();
    let remote = a.prepare_remote(&peer, &[bbuf.region()]).unwrap();
    let e = a.write(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{provider}: {e}");
    let e = a.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{provider}: {e}");
    assert_eq!(bbuf.to_vec(), pattern(4096, 2), "{provider}: the target's memory changed");
    assert_eq!(abuf.to_vec(), pattern(4096, 1), "{provider}: the initiator's memory changed");
}

#[test]
fn tcp_provider_refuses_agents_with_another_secret() {
    another_secret("tcp");
}

#[test]
fn shm_provider_refuses_agents_with_another_secret() {
    another_secret("shm");
}

#[test]
fn a_peer_that_never_answers_the_handshake_fails_the_batch_at_its_deadline() {
    // A rail without authentication drops hellos as malformed: no challenge ever comes.
    let a = FabricTransport::start("asker", config("tcp"), Auth::resolve(&secret(SECRET)).unwrap(), Arc::default());
    let b = FabricTransport::start("silent", config("tcp"), Auth::disabled(), Arc::default()).unwrap();
    let (abuf, bbuf) = (buffer(4096), buffer(4096));
    bbuf.write_at(0, &pattern(4096, 5)).unwrap();
    let a = a.unwrap();
    a.register(abuf.region(), None).unwrap();
    let key = b.register(bbuf.region(), None).unwrap();
    let link = a.link("silent", &b.endpoint(), vec![RemoteRegion { region: bbuf.region(), key }]).unwrap();
    let op =
        XferOp { local_addr: abuf.as_ptr() as u64, remote_region: 0, remote_addr: bbuf.as_ptr() as u64, len: 4096 };
    let deadline = Deadline::after(Duration::from_millis(500));
    let completion = Arc::new(Completion::new("silent", Op::Read, 4096, None, deadline));
    link.post(Batch { ops: vec![op], completion: completion.clone(), keep_alive: Arc::new(()) }).unwrap();
    let e = completion.wait().unwrap_err();
    // At the deadline: the waiter's Timeout, or the rail's Unauthenticated when it settles first.
    assert!(matches!(e.code(), ErrorCode::Timeout | ErrorCode::Unauthenticated), "{e}");
    assert!(deadline.expired(), "it waited for the deadline: the peer was given its chance");
    assert_eq!(abuf.to_vec(), vec![0u8; 4096], "nothing was read");
}

/// Waits (bounded) until `rail` has handled every message of `sent`.
fn handled(transport: &FabricTransport, sent: &[&[u8]]) {
    let deadline = soon();
    while !sent.iter().all(|m| transport.rails[0].received.locked().iter().any(|r| r == m)) {
        assert!(!deadline.expired(), "the messages did not arrive");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forged_and_replayed_messages_are_not_acted_upon() {
    let member = || Auth::resolve(&secret(SECRET)).unwrap();
    let queue = Arc::new(NotificationQueue::default());
    let a = FabricTransport::start("sender", config("tcp"), member(), Arc::default()).unwrap();
    let b = FabricTransport::start("target", config("tcp"), member(), queue.clone()).unwrap();
    // The stranger sends raw bytes from its own endpoint.
    let stranger = FabricTransport::start("stranger", config("tcp"), Auth::disabled(), Arc::default()).unwrap();
    let bbuf = buffer(4096);
    let key = b.register(bbuf.region(), None).unwrap();
    let link = a.link("target", &b.endpoint(), vec![RemoteRegion { region: bbuf.region(), key: key.clone() }]).unwrap();
    let notify = |data: &[u8]| {
        let completion = Arc::new(Completion::new("target", Op::Notify, 0, Some(data.to_vec()), soon()));
        link.post(Batch { ops: Vec::new(), completion: completion.clone(), keep_alive: Arc::new(()) }).unwrap();
        completion.wait().unwrap();
        let notes = queue.wait(soon());
        assert_eq!(notes.len(), 1);
        assert_eq!((notes[0].from.as_str(), notes[0].data.as_slice()), ("sender", data));
    };
    notify(b"genuine 1");
    // The rail logs a message after handling it, so the log may trail the queue a moment.
    let deadline = soon();
    let genuine = loop {
        if let Some(m) = b.rails[0].received.locked().iter().rev().find(|m| m[0] == 8) {
            break m.clone();
        }
        assert!(!deadline.expired(), "the genuine notification was never logged");
        std::thread::sleep(Duration::from_millis(5));
    };

    let target = &b.rails[0].address;
    // A notification without a session, answered to the stranger.
    let mut plain = vec![8u8];
    plain.extend_from_slice(&0xbeefu64.to_le_bytes());
    plain.extend_from_slice(&(stranger.rails[0].address.len() as u16).to_le_bytes());
    plain.extend_from_slice(&stranger.rails[0].address);
    plain.extend_from_slice(&6u16.to_le_bytes());
    plain.extend_from_slice(b"sender");
    plain.extend_from_slice(b"forged");
    // A check of the target's real key, answered to the stranger.
    let key = super::decode_key(&key).unwrap();
    let mut check = vec![2u8];
    check.extend_from_slice(&0xfeedu64.to_le_bytes());
    check.extend_from_slice(&(stranger.rails[0].address.len() as u16).to_le_bytes());
    check.extend_from_slice(&stranger.rails[0].address);
    check.extend_from_slice(&1u16.to_le_bytes());
    check.extend_from_slice(&(bbuf.as_ptr() as u64).to_le_bytes());
    check.extend_from_slice(&4096u64.to_le_bytes());
    check.push(key.keys.len() as u8);
    key.keys.iter().for_each(|k| check.extend_from_slice(&k.to_le_bytes()));
    // The genuine message again, with the counter moved on (its tag no longer matches).
    let mut altered = genuine.clone();
    altered[2] = altered[2].wrapping_add(1);
    for m in [&plain, &genuine, &altered, &check] {
        stranger.rails[0].send_raw(target, m.clone());
    }
    handled(&b, &[&plain, &genuine, &altered, &check]);
    assert!(queue.take().is_empty(), "a forged or replayed notification was delivered");

    // A hello from the stranger is answered with a challenge (which it cannot meet); the check
    // sent before it was answered with nothing.
    let mut hello = vec![4u8];
    hello.extend_from_slice(&(stranger.rails[0].address.len() as u16).to_le_bytes());
    hello.extend_from_slice(&stranger.rails[0].address);
    hello.extend_from_slice(&[9u8; 32]);
    stranger.rails[0].send_raw(target, hello);
    let deadline = soon();
    while stranger.rails[0].received.locked().is_empty() {
        assert!(!deadline.expired(), "the target did not answer the stranger's hello");
        std::thread::sleep(Duration::from_millis(5));
    }
    let answers: Vec<u8> = stranger.rails[0].received.locked().iter().map(|m| m[0]).collect();
    assert_eq!(answers, vec![5], "the target answered the stranger with more than a challenge");

    notify(b"genuine 2");
}

/// A receiver answers every notification: queued, or busy when its queue is full, so the sender
/// learns it (`PeerBusy`) and the receiver holds no more than its limits, whatever is sent.
#[test]
fn a_full_notification_queue_answers_busy_and_nothing_queues_past_its_limits() {
    let member = || Auth::resolve(&secret(SECRET)).unwrap();
    let queue = Arc::new(NotificationQueue::with_limits(2, 100 << 10));
    let a = FabricTransport::start("sender", config("tcp"), member(), Arc::default()).unwrap();
    let b = FabricTransport::start("target", config("tcp"), member(), queue.clone()).unwrap();
    let bbuf = buffer(4096);
    let key = b.register(bbuf.region(), None).unwrap();
    let link = a.link("target", &b.endpoint(), vec![RemoteRegion { region: bbuf.region(), key }]).unwrap();
    let notify = |data: &[u8]| {
        let completion = Arc::new(Completion::new("target", Op::Notify, 0, Some(data.to_vec()), soon()));
        link.post(Batch { ops: Vec::new(), completion: completion.clone(), keep_alive: Arc::new(()) }).unwrap();
        completion.wait()
    };
    notify(b"first").unwrap();
    notify(b"second").unwrap();
    let refused = notify(b"third").unwrap_err();
    assert_eq!(refused.code(), ErrorCode::PeerBusy, "{refused}");
    // Past the byte limit too: a notification larger than the room left.
    let taken: Vec<Vec<u8>> = queue.take().into_iter().map(|n| n.data).collect();
    assert_eq!(taken, [b"first".to_vec(), b"second".to_vec()]);
    notify(&vec![7u8; 60 << 10]).unwrap();
    assert_eq!(notify(&vec![8u8; 60 << 10]).unwrap_err().code(), ErrorCode::PeerBusy);
    assert_eq!(queue.take().len(), 1);
    notify(b"after").unwrap();
    assert_eq!(queue.take()[0].data, b"after");
}

/// The agent asks the link how long a notification may be: a fabric message carries 64 KiB, so
/// one byte more is refused before anything is sent, while TCP would carry it.
#[test]
fn a_notification_longer_than_a_fabric_message_is_refused_before_it_is_sent() {
    let (a, b) = (agent("long-a", "tcp"), agent("long-b", "tcp"));
    let peer = a.add_peer(&b.metadata()).unwrap();
    b.add_peer(&a.metadata()).unwrap();
    let limit = super::MAX_NOTIFICATION as usize;
    let e = a.notify(&peer, &vec![1u8; limit + 1], soon()).map(drop).unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    assert!(e.to_string().contains(&format!("the fabric transport's limit of {limit}")), "{e}");
    a.notify(&peer, &vec![2u8; limit], soon()).unwrap().wait().unwrap();
    let deadline = soon();
    let mut got = Vec::new();
    while got.is_empty() && !deadline.expired() {
        got = b.wait_notifications(deadline);
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, vec![2u8; limit]);
}
