//! A receiver's queue of notifications is bounded: once full, the sender's notification fails with
//! `PeerBusy` (506) and nothing is queued beyond the limits; once taken, notifications flow again.
//! Over TCP and over shm alike.

use std::time::Duration;

use kvferry_core::transport::shm::ShmConfig;
use kvferry_core::{Agent, AgentConfig, AgentLimits, AuthConfig, Deadline, ErrorCode, TransportKind};

/// Take notifications until `count` have arrived (each is queued just after its acknowledgement).
fn take(receiver: &Agent, count: usize) -> Vec<Vec<u8>> {
    let deadline = Deadline::after(Duration::from_secs(30));
    let mut got = Vec::new();
    while got.len() < count && !deadline.expired() {
        got.extend(receiver.wait_notifications(deadline).into_iter().map(|n| n.data));
    }
    got
}

fn config(name: &str, limits: AgentLimits, over: TransportKind) -> AgentConfig {
    let auth = AuthConfig::Secret(b"the limits tests' cluster secret".to_vec());
    let shm = (over == TransportKind::Shm).then(ShmConfig::default);
    AgentConfig { shm, auth, limits, ..AgentConfig::new(name) }
}

#[test]
fn a_full_notification_queue_answers_the_sender_busy() {
    full_queue_answers_busy(TransportKind::Tcp);
}

#[test]
fn a_full_notification_queue_answers_an_shm_sender_busy() {
    full_queue_answers_busy(TransportKind::Shm);
}

fn full_queue_answers_busy(over: TransportKind) {
    let limits = AgentLimits { max_notifications: 4, max_notification_bytes: 2 << 20, ..AgentLimits::default() };
    let receiver = Agent::new(config("nq-receiver", limits, over)).unwrap();
    let sender = Agent::new(config("nq-sender", AgentLimits::default(), over)).unwrap();
    let addr = receiver.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap();
    let soon = || Deadline::after(Duration::from_secs(30));
    let peer = sender.connect_peer(&addr.to_string(), soon()).unwrap();
    assert_eq!(sender.peer_transport("nq-receiver"), Some(over));
    // The count limit: four fit, the fifth is refused.
    for i in 0..4 {
        let sent = sender.notify(&peer, format!("n{i}").as_bytes(), soon()).unwrap();
        sent.wait().unwrap();
        assert_eq!(sent.transport(), over);
    }
    let e = sender.notify(&peer, b"n4", soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::PeerBusy, "{e}");
    assert_eq!(ErrorCode::PeerBusy as i32, 506);
    // In any order: over TCP they may travel on different streams.
    let mut taken = take(&receiver, 4);
    taken.sort();
    assert_eq!(taken, [b"n0", b"n1", b"n2", b"n3"]);
    // The byte limit: two notifications of 1 MiB fit in 2 MiB, a third does not.
    let mib = vec![7u8; 1 << 20];
    for _ in 0..2 {
        sender.notify(&peer, &mib, soon()).unwrap().wait().unwrap();
    }
    let e = sender.notify(&peer, &mib, soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::PeerBusy, "{e}");
    let held: usize = take(&receiver, 2).iter().map(Vec::len).sum();
    assert_eq!(held, 2 << 20, "nothing beyond the byte limit was queued");
    assert!(receiver.take_notifications().is_empty());
    sender.notify(&peer, b"again", soon()).unwrap().wait().unwrap();
    // Longer than the link carries (1 MiB over TCP and shm): refused before anything is sent.
    let e = sender.notify(&peer, &vec![0u8; (1 << 20) + 1], soon()).map(drop).unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    assert!(e.to_string().contains(&format!("the {over} transport's limit of 1048576")), "{e}");
}
