//! The target's checks, driven by a raw client that speaks the wire format: every descriptor is
//! validated by the memory owner, and a rejected request leaves the connection serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::wire;
use super::{TcpConfig, TcpTransport};
use crate::auth::{Auth, AuthConfig, Channel};
use crate::deadline::Deadline;
use crate::memory::host::{HostAllocOptions, HostBuffer};
use crate::transport::frame::{self, FrameKind, Header, WireDesc};
use crate::transport::{NotificationQueue, RejectReason, Transport};

struct Fixture {
    transport: TcpTransport,
    buffer: Arc<HostBuffer>,
    key: u128,
    notifications: Arc<NotificationQueue>,
}

fn fixture() -> Fixture {
    fixture_with(TcpConfig::default())
}

fn fixture_with(config: TcpConfig) -> Fixture {
    let notifications = Arc::new(NotificationQueue::default());
    let transport = TcpTransport::start("target", config, test_auth(), notifications.clone()).unwrap();
    let buffer =
        Arc::new(HostBuffer::alloc(64 * 1024, &HostAllocOptions { pin: false, ..Default::default() }).unwrap());
    for i in 0..buffer.len() {
        buffer.write_at(i, &[(i % 251) as u8]).unwrap();
    }
    let key = transport.register(buffer.region(), None).unwrap();
    let key = u128::from_le_bytes(key.try_into().unwrap());
    Fixture { transport, buffer, key, notifications }
}

fn test_auth() -> Auth {
    Auth::resolve(&AuthConfig::Secret(b"the tcp tests' cluster secret".to_vec())).unwrap()
}

/// A raw connection that has proven the secret.
fn authenticated(f: &Fixture) -> TcpStream {
    let mut s = TcpStream::connect(f.transport.listen_addr()).unwrap();
    test_auth().client(&mut s, Channel::Tcp, Deadline::after(Duration::from_secs(5))).unwrap();
    s
}

fn client(f: &Fixture) -> TcpStream {
    let mut s = authenticated(f);
    s.write_all(&wire::encode_hello("raw-client")).unwrap();
    let mut ack = [0u8; wire::HELLO_ACK_LEN];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[6], wire::HELLO_OK);
    s
}

fn request(s: &mut TcpStream, kind: FrameKind, descs: &[WireDesc], payload: &[u8]) -> Header {
    let mut frame =
        Header { tag: kind as u8, count: descs.len() as u32, payload_len: payload.len() as u64 }.encode().to_vec();
    for d in descs {
        d.encode_into(&mut frame);
    }
    frame.extend_from_slice(payload);
    s.write_all(&frame).unwrap();
    Header::read_from(s).unwrap()
}

fn base(f: &Fixture) -> u64 {
    f.buffer.as_ptr() as u64
}

#[test]
fn valid_read_returns_the_registered_bytes() {
    let f = fixture();
    let mut s = client(&f);
    let d = WireDesc { key: f.key, addr: base(&f) + 100, len: 300 };
    let h = request(&mut s, FrameKind::Read, &[d], &[]);
    assert_eq!((h.tag, h.payload_len), (0, 300));
    let mut got = vec![0u8; 300];
    s.read_exact(&mut got).unwrap();
    let expected: Vec<u8> = (100..400).map(|i| (i % 251) as u8).collect();
    assert_eq!(got, expected);
}

#[test]
fn every_bad_descriptor_is_rejected_with_its_reason_and_index() {
    let f = fixture();
    let mut s = client(&f);
    let good = WireDesc { key: f.key, addr: base(&f), len: 16 };
    let end = base(&f) + f.buffer.len() as u64;
    let cases = [
        (WireDesc { key: f.key ^ 1, ..good }, RejectReason::UnknownKey),
        (WireDesc { addr: end - 8, ..good }, RejectReason::OutOfRange),
        (WireDesc { addr: base(&f) - 1, ..good }, RejectReason::OutOfRange),
        (WireDesc { len: 0, ..good }, RejectReason::ZeroLength),
        (WireDesc { addr: u64::MAX - 4, ..good }, RejectReason::RangeOverflow),
    ];
    for (bad, reason) in cases {
        for kind in [FrameKind::Read, FrameKind::Write] {
            let payload = if kind == FrameKind::Write { vec![7u8; (16 + bad.len) as usize] } else { vec![] };
            let h = request(&mut s, kind, &[good, bad], &payload);
            assert_eq!(RejectReason::from_wire(h.tag), Some(reason), "{kind:?} {bad:?}");
            assert_eq!(h.count, 1, "the second descriptor is the bad one");
        }
    }
    // Nothing was written by the rejected writes, and the same connection still serves.
    assert_eq!(f.buffer.to_vec()[..16], (0..16).map(|i| i as u8).collect::<Vec<_>>()[..]);
    let h = request(&mut s, FrameKind::Write, &[good], &[9u8; 16]);
    assert_eq!(h.tag, 0);
    assert_eq!(f.buffer.to_vec()[..16], [9u8; 16]);
}

#[test]
fn a_deregistered_key_is_unknown() {
    let f = fixture();
    let mut s = client(&f);
    f.transport.deregister(&f.key.to_le_bytes());
    let h = request(&mut s, FrameKind::Read, &[WireDesc { key: f.key, addr: base(&f), len: 8 }], &[]);
    assert_eq!(RejectReason::from_wire(h.tag), Some(RejectReason::UnknownKey));
}

#[test]
fn oversized_requests_are_refused_and_other_clients_keep_working() {
    let f = fixture();
    let mut hostile = client(&f);
    let header = Header { tag: FrameKind::Read as u8, count: (frame::MAX_DESCS + 1) as u32, payload_len: 0 };
    hostile.write_all(&header.encode()).unwrap();
    let h = Header::read_from(&mut hostile).unwrap();
    assert_eq!(RejectReason::from_wire(h.tag), Some(RejectReason::TooLarge));
    // The target closed that connection.
    let mut rest = Vec::new();
    assert_eq!(hostile.read_to_end(&mut rest).unwrap_or(0), 0);

    let mut s = client(&f);
    let h = request(&mut s, FrameKind::Read, &[WireDesc { key: f.key, addr: base(&f), len: 8 }], &[]);
    assert_eq!(h.tag, 0);
}

#[test]
fn a_write_whose_payload_disagrees_with_its_descriptors_closes_the_connection() {
    let f = fixture();
    let mut s = client(&f);
    let d = WireDesc { key: f.key, addr: base(&f), len: 16 };
    let mut frame = Header { tag: FrameKind::Write as u8, count: 1, payload_len: 8 }.encode().to_vec();
    d.encode_into(&mut frame);
    frame.extend_from_slice(&[1u8; 8]);
    s.write_all(&frame).unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0);
    assert_eq!(f.buffer.to_vec()[..16], (0..16).map(|i| i as u8).collect::<Vec<_>>()[..]);
}

#[test]
fn wrong_magic_and_wrong_version_are_refused() {
    let f = fixture();
    let mut s = TcpStream::connect(f.transport.listen_addr()).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.starts_with(b"KVFA"), "only the handshake's refusal comes back: {rest:?}");

    let mut s = authenticated(&f);
    let mut hello = wire::encode_hello("old");
    hello[4..6].copy_from_slice(&(wire::VERSION + 1).to_le_bytes());
    s.write_all(&hello).unwrap();
    let mut ack = [0u8; wire::HELLO_ACK_LEN];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[6], wire::HELLO_BAD_VERSION);
}

#[test]
fn notifications_carry_the_sender_name() {
    let f = fixture();
    let mut s = client(&f);
    let h = request(&mut s, FrameKind::Notify, &[], b"req-42 done");
    assert_eq!(h.tag, 0);
    // Queued just after the acknowledgement (see `serve_connection`), so wait for it.
    let got = f.notifications.wait(Deadline::after(Duration::from_secs(5)));
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].from.as_str(), got[0].data.as_slice()), ("raw-client", &b"req-42 done"[..]));
}

#[test]
fn a_request_stalled_midway_is_dropped_and_deregistration_does_not_wait_for_it() {
    let f = fixture_with(TcpConfig { request_timeout: Duration::from_millis(200), ..TcpConfig::default() });
    let mut idle = client(&f);
    let mut stalled = client(&f);
    let d = WireDesc { key: f.key, addr: base(&f), len: 4096 };
    let mut frame = Header { tag: FrameKind::Write as u8, count: 1, payload_len: 4096 }.encode().to_vec();
    d.encode_into(&mut frame);
    frame.extend_from_slice(&[1u8; 100]); // and then nothing more
    stalled.write_all(&frame).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    f.transport.deregister(&f.key.to_le_bytes());
    assert!(started.elapsed() < Duration::from_secs(5), "deregistration waited {:?}", started.elapsed());
    let mut rest = Vec::new();
    assert_eq!(stalled.read_to_end(&mut rest).unwrap_or(0), 0, "the stalled connection was closed");
    // An idle connection is not a stalled request: it still works after the timeout.
    std::thread::sleep(Duration::from_millis(300));
    let h = request(&mut idle, FrameKind::Notify, &[], b"still here");
    assert_eq!(h.tag, 0);
}

#[test]
fn a_client_without_the_secret_reads_nothing() {
    let f = fixture();
    for auth in
        [Auth::disabled(), Auth::resolve(&AuthConfig::Secret(b"a guess at the cluster secret".to_vec())).unwrap()]
    {
        let mut s = TcpStream::connect(f.transport.listen_addr()).unwrap();
        assert!(auth.client(&mut s, Channel::Tcp, Deadline::after(Duration::from_secs(5))).is_err());
        // Whatever it sends next, a READ with the right key included, gets no byte of memory.
        let mut frame = wire::encode_hello("intruder");
        frame.extend_from_slice(&Header { tag: FrameKind::Read as u8, count: 1, payload_len: 0 }.encode());
        WireDesc { key: f.key, addr: f.buffer.region().addr, len: 64 }.encode_into(&mut frame);
        let _ = s.write_all(&frame);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(!rest.windows(8).any(|w| w == &f.buffer.to_vec()[..8]), "memory leaked: {rest:?}");
        assert!(rest.len() < 64, "{} bytes came back", rest.len());
    }
}
